// How numbers, sizes and dates read on the page. The exact value goes in a title where a
// rounded one is shown.

export function fmtBytes(n) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (Math.abs(value) >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return unit === 0 ? `${value} B` : `${value.toPrecision(3)} ${units[unit]}`;
}

export function fmtCount(n) {
  if (n === null || n === undefined) return "–";
  const steps = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
  for (const [size, suffix] of steps) if (Math.abs(n) >= size) return `${(n / size).toPrecision(3)} ${suffix}`;
  return String(n);
}

export function fmtNumber(n, digits = 4) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (!Number.isFinite(n)) return String(n);
  if (Number.isInteger(n) && Math.abs(n) < 1e6) return String(n);
  return Number(n).toPrecision(digits).replace(/\.?0+$/, (m) => (m.includes(".") ? "" : m));
}

export function fmtPercent(x, digits = 1) {
  return x === null || x === undefined ? "–" : `${(x * 100).toFixed(digits)}%`;
}

export function fmtDate(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

export function stagesSummary(spec) {
  return (spec?.stages || []).map((s) => `${s.type}.${s.method}`).join(" → ") || "–";
}

export function shortId(id) {
  return id && id.length > 16 ? `${id.slice(0, 12)}…` : id;
}
