// A table filled a page at a time from a list endpoint, with its "Load more" button and its
// "nothing yet" line (the models, datasets and jobs tables).

import { listPage } from "./api.js";
import { $, flash } from "./dom.js";

/** Returns load(reset): reset reloads the first page, otherwise the next page is appended. */
export function pagedTable(tableSelector, path, rowFor) {
  const table = $(tableSelector);
  const card = table.closest(".card");
  const body = $("tbody", table);
  const more = $(".more", card);
  const empty = $(".empty", card);
  let after = null;
  async function load(reset) {
    const cursor = reset ? null : after;
    const page = await listPage(path, { limit: 20, after: cursor });
    // Rows are replaced only once the page is here: two quick reloads never duplicate rows.
    if (reset) body.replaceChildren(...page.data.map(rowFor));
    else body.append(...page.data.map(rowFor));
    after = page.data.length ? page.data[page.data.length - 1].id : cursor;
    more.hidden = !page.has_more;
    empty.hidden = body.children.length > 0;
    return page.data;
  }
  more.onclick = () => load(false).catch((err) => flash(err.message));
  return load;
}
