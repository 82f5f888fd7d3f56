// The review queue: unreviewed (or uncertain) inspections one after the other; n / d give the verdict and move on.
import { imageUrl, query, settings } from "../api.js";
import { PageContext, modelPicker } from "../state.js";
import { errorBox, fmtScore, h, imgOr } from "../ui.js";
import { inspectionView } from "./inspection.js";

export const title = "Review";
const LIMIT = 100;

const QUEUES = {
  unreviewed: { label: "unreviewed", params: { verdict: "none" } },
  uncertain: { label: "unreviewed and uncertain", params: { verdict: "none", uncertain: "true" } },
  defects: { label: "unreviewed defects", params: { verdict: "none", decision: "defect" } },
  all_uncertain: { label: "all uncertain (reviewed too)", params: { uncertain: "true" } },
};

export async function render(view, ctx) {
  let model = "";
  let queue = settings.get("queue") in QUEUES ? settings.get("queue") : "unreviewed";
  let items = [];
  let selected = null; // id
  const list = h("div", { class: "panel queue", id: "queue" });
  const detail = h("div", { id: "review-detail" });
  const counter = h("span", { class: "counts" });
  const status = h("div", {});
  let detailCtx = null; // the shown inspection's keyboard handlers and fetches live here
  ctx.cleanups.push(() => detailCtx && detailCtx.dispose());

  const picker = await modelPicker((m) => { model = m; load(); }, { all: true, id: "review-model" });
  model = picker.value();
  const queueSelect = h("select", { id: "review-queue", "aria-label": "queue" },
    Object.entries(QUEUES).map(([k, q]) => h("option", { value: k }, q.label)));
  queueSelect.value = queue;
  queueSelect.addEventListener("change", () => { queue = queueSelect.value; settings.set("queue", queue); load(); });

  view.append(
    h("div", { class: "toolbar" },
      h("h1", { style: "margin:0" }, "Review queue"),
      picker.element,
      h("label", { class: "field" }, h("span", {}, "Queue"), queueSelect),
      h("span", { class: "spacer" }),
      counter,
      h("span", { class: "keys" }, h("kbd", {}, "n"), " normal · ", h("kbd", {}, "d"), " defect · ",
        h("kbd", {}, "j"), "/", h("kbd", {}, "k"), " next / previous")),
    status,
    h("div", { class: "review" }, list, detail));

  function subContext() {
    if (detailCtx) detailCtx.dispose();
    detailCtx = new PageContext();
    return detailCtx;
  }

  function drawList() {
    list.replaceChildren(...items.map((item) => {
      const el = h("button", { type: "button", class: `queue-item${item.id === selected ? " selected" : ""}`, "data-id": item.id,
        "data-decision": item.decision || "none", onclick: () => select(item.id) },
      imgOr(imageUrl(item.id, "thumbnail"), "", ""),
      h("span", {}, h("b", { class: "mono" }, fmtScore(item.score)), ` #${item.id}`,
        h("div", { class: "small" }, `${item.model}${item.uncertain ? " · uncertain" : ""}${item.verdict ? ` · ${item.verdict.verdict}` : ""}`)));
      return el;
    }));
    if (!items.length) list.replaceChildren(h("p", { class: "muted", style: "padding:.5rem" }, "Queue empty."));
    counter.replaceChildren(h("span", {}, "in queue ", h("b", { id: "queue-count" }, String(total))));
    const sel = list.querySelector(".selected");
    if (sel) sel.scrollIntoView({ block: "nearest" });
  }

  let total = 0;
  async function load(keepId = null) {
    let data;
    try {
      data = await ctx.get(`/inspections${query({ model, ...QUEUES[queue].params, limit: LIMIT })}`);
    } catch (err) {
      if (err.name === "AbortError") return;
      status.replaceChildren(errorBox(err, () => load()));
      return;
    }
    status.replaceChildren();
    items = data.items;
    total = data.total;
    const next = items.find((i) => i.id === keepId) || items[0];
    if (next) await select(next.id);
    else {
      selected = null;
      subContext();
      detail.replaceChildren(h("div", { class: "empty" }, h("b", {}, "Nothing to review."), h("br"),
        "New inspections appear here until an operator gives them a verdict."));
      drawList();
    }
  }

  async function select(id) {
    selected = id;
    drawList();
    const item = items.find((i) => i.id === id);
    if (!item) return;
    const sub = subContext();
    detail.replaceChildren(inspectionView(sub, item, { keys: true, onVerdict: (updated) => advance(updated) }));
  }

  // After a verdict: the queues of unreviewed items drop it and show the next one; others show it updated.
  function advance(updated) {
    const i = items.findIndex((x) => x.id === updated.id);
    const dropped = "verdict" in QUEUES[queue].params;
    if (dropped) {
      const after = items[i + 1] || items[i - 1];
      load(after ? after.id : null);
    } else {
      items[i] = updated;
      select(updated.id);
    }
  }

  ctx.on(document, "keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.target.closest && e.target.closest("input, textarea, select")) return;
    const i = items.findIndex((x) => x.id === selected);
    if ((e.key === "j" || e.key === "ArrowDown") && i < items.length - 1) { e.preventDefault(); select(items[i + 1].id); }
    if ((e.key === "k" || e.key === "ArrowUp") && i > 0) { e.preventDefault(); select(items[i - 1].id); }
  });

  await load();
}
