// The live feed: the latest inspection large, the ones before it as cards; polled every 2 s, cards kept by id.
import { imageUrl, query } from "../api.js";
import { modelPicker } from "../state.js";
import { decisionBadge, errorBox, fmtAgo, fmtScore, h, imgOr, verdictBadge } from "../ui.js";

export const title = "Feed";
const LIMIT = 48;
const POLL_MS = 2000;

function card(item) {
  return h("a", { class: "card", href: `#/inspection/${item.id}`, "data-id": item.id, "data-decision": item.decision || "none" },
    h("div", { class: "thumb" }, imgOr(imageUrl(item.id, "thumbnail"), `inspection ${item.id}`, "no image")),
    h("div", { class: "meta" },
      h("div", { class: "row" }, h("span", { class: "score" }, fmtScore(item.score)), decisionBadge(item.decision)),
      h("div", { class: "row" },
        h("span", { class: "small" }, `#${item.id} · ${item.model}`),
        item.uncertain ? h("span", { class: "tag tag-uncertain" }, "uncertain") : null),
      h("div", { class: "row" }, h("span", { class: "small ago", "data-created": item.created }, fmtAgo(item.created)), verdictBadge(item.verdict))));
}

function latestPanel(item) {
  if (!item) return h("div", { class: "panel latest" }, h("div", { class: "empty" }, "No inspection yet."));
  const src = item.image_stored ? imageUrl(item.id, "overlay", { alpha: 0.45 }) : imageUrl(item.id, "heatmap");
  return h("a", { class: "panel latest", href: `#/inspection/${item.id}`, style: "display:block;color:inherit;text-decoration:none", "data-id": item.id },
    h("div", { class: "muted", style: "font-size:.8rem;text-transform:uppercase;letter-spacing:.05em" }, "Latest inspection"),
    imgOr(src, `latest inspection ${item.id}`, "no image", { class: "latest-img", style: `aspect-ratio:${item.width} / ${item.height}` }),
    h("div", { class: "latest-head" },
      decisionBadge(item.decision, { big: true }),
      h("span", { class: "latest-score" }, fmtScore(item.score)),
      h("span", { class: "muted" }, item.threshold === null ? "" : `threshold ${fmtScore(item.threshold)}`),
      item.uncertain ? h("span", { class: "tag tag-uncertain" }, "uncertain") : null),
    h("div", { class: "muted" }, `#${item.id} · ${item.model} v${item.model_version} · ${item.source || "no source"} · `,
      h("span", { class: "ago", "data-created": item.created }, fmtAgo(item.created))),
    h("p", { class: "sentence" }, item.sentence));
}

// What makes a card stale: the fields it shows that can change after the inspection.
const signature = (item) => JSON.stringify([item.decision, item.verdict, item.uncertain]);

export async function render(view, ctx) {
  let model = "";
  let decision = "";
  let live = true;
  const cards = new Map(); // id -> {el, sig}
  let firstLoad = true;
  let shownLatest = null;
  let maxSeen = 0; // the newest id shown before this poll: newer cards flash once

  const grid = h("div", { class: "cards", id: "feed-cards" });
  const latestHost = h("div", {});
  const status = h("div", {});
  const counts = h("div", { class: "counts" });
  const dot = h("span", { class: "live-dot" });

  const picker = await modelPicker((m) => { model = m; reset(); }, { all: true, id: "feed-model" });
  model = picker.value();
  const decisionSelect = h("select", { id: "feed-decision", "aria-label": "decision" },
    h("option", { value: "" }, "all decisions"), h("option", { value: "defect" }, "defects only"), h("option", { value: "normal" }, "normals only"));
  decisionSelect.addEventListener("change", () => { decision = decisionSelect.value; reset(); });
  const liveBox = h("input", { type: "checkbox", checked: true, id: "feed-live" });
  liveBox.addEventListener("change", () => { live = liveBox.checked; dot.classList.toggle("off", !live); if (live) refresh(); });

  view.append(
    h("div", { class: "toolbar" },
      h("h1", { style: "margin:0" }, "Live feed"),
      picker.element,
      h("label", { class: "field" }, h("span", {}, "Decision"), decisionSelect),
      h("label", { class: "check" }, liveBox, dot, "live (every 2 s)"),
      h("span", { class: "spacer" }),
      counts),
    status,
    h("div", { class: "feed" }, latestHost, h("div", {}, grid)));

  function reset() {
    cards.clear();
    shownLatest = null;
    maxSeen = 0;
    grid.replaceChildren();
    firstLoad = true;
    refresh();
  }

  async function refresh() {
    let data;
    try {
      data = await ctx.get(`/inspections${query({ model, decision, limit: LIMIT })}`);
    } catch (err) {
      if (err.name === "AbortError") return;
      status.replaceChildren(errorBox({ status: err.status, detail: `${err.detail || err.message} (the feed keeps retrying)` }));
      return;
    }
    status.replaceChildren();
    const items = data.items;
    const [latest, ...rest] = items;
    const latestSig = latest ? `${latest.id}:${signature(latest)}` : "";
    if (latestSig !== shownLatest) {
      latestHost.replaceChildren(latestPanel(latest));
      shownLatest = latestSig;
    }
    const keep = new Set(rest.map((i) => i.id));
    for (const id of [...cards.keys()]) if (!keep.has(id)) cards.delete(id);
    const ordered = rest.map((item) => {
      let entry = cards.get(item.id);
      const sig = signature(item);
      if (!entry || entry.sig !== sig) {
        const fresh = !firstLoad && item.id > maxSeen;
        entry = { el: card(item), sig };
        if (fresh) entry.el.classList.add("fresh");
        cards.set(item.id, entry);
      }
      return entry.el;
    });
    grid.replaceChildren(...ordered);
    if (latest) maxSeen = Math.max(maxSeen, latest.id);
    if (!items.length) grid.replaceChildren(h("div", { class: "empty" }, "Nothing here yet: post an image to ", h("code", {}, "/api/v1/models/NAME/inspect"), " or use the ", h("a", { href: "#/upload" }, "upload page"), "."));
    for (const el of view.querySelectorAll(".ago")) el.textContent = fmtAgo(el.dataset.created);
    const defects = items.filter((i) => i.decision === "defect").length;
    counts.replaceChildren(
      h("span", {}, "total ", h("b", { id: "feed-total" }, String(data.total))),
      h("span", {}, "defects in view ", h("b", { style: "color:var(--defect)" }, String(defects))),
      h("span", {}, "unreviewed in view ", h("b", {}, String(items.filter((i) => !i.verdict).length))));
    firstLoad = false;
  }

  await refresh();
  ctx.every(POLL_MS, async () => { if (live) await refresh(); });
}
