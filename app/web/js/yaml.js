// A small YAML subset for the job spec text box: enough for job specs, not a general YAML
// parser. It needs no DOM, so it can be imported anywhere.

/**
 * Parses block mappings and sequences (indented with spaces), flow collections on one line
 * ([1, 2], {a: 1}), quoted and plain scalars, null/true/false/numbers and # comments.
 * Anchors, aliases, tags, multi-line strings and several documents are refused with an error.
 */
export function parseYAML(text) {
  const lines = [];
  String(text).split(/\r?\n/).forEach((raw, index) => {
    const number = index + 1;
    if (/^\s*\t/.test(raw)) throw new Error(`YAML line ${number}: indent with spaces, not tabs`);
    const content = stripComment(raw).replace(/\s+$/, "");
    if (!content.trim()) return;
    if (/^(---|\.\.\.)(\s|$)/.test(content)) {
      if (lines.length) throw new Error(`YAML line ${number}: only one document is supported`);
      return;
    }
    lines.push({ indent: content.length - content.trimStart().length, text: content.trim(), number });
  });
  if (!lines.length) return null;
  let i = 0;

  const isDash = (t) => t === "-" || t.startsWith("- ");
  const keyMatch = (t) => t.match(/^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'|[^\s"'[\]{}#,&*!|>%@`-][^#]*?|-[^\s#][^#]*?)\s*:(?:\s+(.*))?$/);

  /** The node that starts at lines[i], at that line's indentation. */
  function parseNode() {
    const line = lines[i];
    if (isDash(line.text)) return parseSeq(line.indent);
    if (keyMatch(line.text)) return parseMap(line.indent);
    i += 1;
    if (i < lines.length && lines[i].indent > line.indent) throw new Error(`YAML line ${lines[i].number}: unexpected indentation`);
    return scalar(line.text, line.number);
  }

  function parseSeq(indent) {
    const out = [];
    while (i < lines.length && lines[i].indent === indent && isDash(lines[i].text)) {
      const line = lines[i];
      const rest = line.text === "-" ? "" : line.text.slice(2).trim();
      if (!rest) {
        i += 1;
        out.push(i < lines.length && lines[i].indent > indent ? parseNode() : null);
      } else if (isDash(rest) || keyMatch(rest)) {
        // "- key: value" starts a mapping (or "- - x" a sequence) indented to where the key is.
        const column = line.indent + (line.text.length - rest.length);
        lines[i] = { indent: column, text: rest, number: line.number };
        out.push(parseNode());
      } else {
        i += 1;
        out.push(scalar(rest, line.number));
      }
    }
    if (i < lines.length && lines[i].indent > indent) throw new Error(`YAML line ${lines[i].number}: unexpected indentation`);
    return out;
  }

  function parseMap(indent) {
    const out = {};
    while (i < lines.length && lines[i].indent === indent && !isDash(lines[i].text)) {
      const line = lines[i];
      const match = keyMatch(line.text);
      if (!match) throw new Error(`YAML line ${line.number}: expected "key: value"`);
      const key = unquote(match[1], line.number);
      if (Object.prototype.hasOwnProperty.call(out, key)) throw new Error(`YAML line ${line.number}: duplicate key "${key}"`);
      const rest = (match[2] || "").trim();
      i += 1;
      if (rest) out[key] = scalar(rest, line.number);
      else if (i < lines.length && lines[i].indent > indent) out[key] = parseNode();
      else if (i < lines.length && lines[i].indent === indent && isDash(lines[i].text)) out[key] = parseSeq(indent);
      else out[key] = null;
    }
    if (i < lines.length && lines[i].indent > indent) throw new Error(`YAML line ${lines[i].number}: unexpected indentation`);
    return out;
  }

  const result = parseNode();
  if (i < lines.length) throw new Error(`YAML line ${lines[i].number}: unexpected content (check the indentation)`);
  return result;
}

function stripComment(line) {
  let quote = null;
  for (let k = 0; k < line.length; k += 1) {
    const c = line[k];
    if (quote) {
      if (c === "\\" && quote === '"') k += 1;
      else if (c === quote) quote = null;
    } else if (c === '"' || c === "'") {
      if (k === 0 || /[\s:[{,-]/.test(line[k - 1])) quote = c;
    } else if (c === "#" && (k === 0 || /\s/.test(line[k - 1]))) {
      return line.slice(0, k);
    }
  }
  return line;
}

function unquote(token, number) {
  if (token.startsWith('"')) {
    try { return JSON.parse(token); } catch { throw new Error(`YAML line ${number}: bad double-quoted string`); }
  }
  if (token.startsWith("'")) return token.slice(1, -1).replace(/''/g, "'");
  return token;
}

function scalar(token, number) {
  const t = token.trim();
  if (t.startsWith("[") || t.startsWith("{")) return flow(t, number);
  if (/^[|>]/.test(t)) throw new Error(`YAML line ${number}: multi-line strings (| and >) are not supported; use JSON`);
  if (/^[&*!]/.test(t)) throw new Error(`YAML line ${number}: anchors, aliases and tags are not supported`);
  if (t.startsWith('"') || t.startsWith("'")) {
    const quote = t[0];
    const end = quote === '"' ? /^"(?:[^"\\]|\\.)*"$/ : /^'(?:[^']|'')*'$/;
    if (!end.test(t)) throw new Error(`YAML line ${number}: unterminated or trailing text after a quoted string`);
    return unquote(t, number);
  }
  return plain(t);
}

function plain(t) {
  if (/^(null|Null|NULL|~)$/.test(t) || t === "") return null;
  if (/^(true|True|TRUE)$/.test(t)) return true;
  if (/^(false|False|FALSE)$/.test(t)) return false;
  if (/^[-+]?(0|[1-9][0-9_]*)$/.test(t)) return Number(t.replace(/_/g, ""));
  if (/^0x[0-9a-fA-F]+$/.test(t)) return parseInt(t, 16);
  if (/^[-+]?(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(t)) return Number(t.replace(/_/g, ""));
  if (/^[-+]?\.(inf|Inf|INF)$/.test(t)) return t.startsWith("-") ? -Infinity : Infinity;
  if (/^\.(nan|NaN|NAN)$/.test(t)) return NaN;
  return t;
}

/** One-line flow collections: [a, b], {k: v}, nested. */
function flow(text, number) {
  let k = 0;
  const fail = (what) => { throw new Error(`YAML line ${number}: ${what} in "${text}"`); };
  const space = () => { while (k < text.length && /\s/.test(text[k])) k += 1; };
  function value() {
    space();
    const c = text[k];
    if (c === "[") {
      k += 1; const out = []; space();
      if (text[k] === "]") { k += 1; return out; }
      for (;;) {
        out.push(value()); space();
        if (text[k] === ",") { k += 1; space(); if (text[k] === "]") { k += 1; return out; } continue; }
        if (text[k] === "]") { k += 1; return out; }
        fail("expected , or ]");
      }
    }
    if (c === "{") {
      k += 1; const out = {}; space();
      if (text[k] === "}") { k += 1; return out; }
      for (;;) {
        const key = token(true); space();
        if (text[k] !== ":") fail("expected :");
        k += 1;
        out[typeof key === "string" ? key : String(key)] = value(); space();
        if (text[k] === ",") { k += 1; space(); if (text[k] === "}") { k += 1; return out; } continue; }
        if (text[k] === "}") { k += 1; return out; }
        fail("expected , or }");
      }
    }
    return token(false);
  }
  function token(isKey) {
    space();
    const c = text[k];
    if (c === '"' || c === "'") {
      const re = c === '"' ? /^"(?:[^"\\]|\\.)*"/ : /^'(?:[^']|'')*'/;
      const m = text.slice(k).match(re);
      if (!m) fail("unterminated string");
      k += m[0].length;
      return unquote(m[0], number);
    }
    const start = k;
    while (k < text.length) {
      const ch = text[k];
      if (ch === "," || ch === "]" || ch === "}") break;
      // A key ends at ": " (or ":" before , ] } or the end); "2:4" stays one scalar.
      if (isKey && ch === ":" && /[\s,\]}]/.test(text[k + 1] ?? " ")) break;
      k += 1;
    }
    const raw = text.slice(start, k).trim();
    if (!raw && !isKey) fail("missing value");
    return isKey ? raw : plain(raw);
  }
  const result = value();
  space();
  if (k < text.length) fail("unexpected text after the collection");
  return result;
}
