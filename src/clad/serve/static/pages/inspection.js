// One inspection: the input with the heatmap over it (opacity slider), the region boxes, the sentence, the closest
// normal patch, and the operator's verdict. `inspectionView` is shared with the review page.
import { imageUrl, settings } from "../api.js";
import { PageContext } from "../state.js";
import { decisionBadge, errorBox, fact, flash, fmtPct, fmtScore, fmtTime, h, imgOr, verdictBadge } from "../ui.js";

export const title = "Inspection";

export async function render(view, ctx, id) {
  if (!/^\d+$/.test(id || "")) {
    view.append(errorBox({ detail: `"${id || ""}" is not an inspection id: open one from the feed.` }));
    return;
  }
  const insp = await ctx.get(`/inspections/${id}`);
  let shown = null; // the drawn inspection's listeners and fetches, replaced when a verdict redraws it
  ctx.cleanups.push(() => shown && shown.dispose());
  const show = (item) => {
    if (shown) shown.dispose();
    shown = new PageContext();
    view.replaceChildren(
      h("div", { class: "toolbar" },
        h("h1", {}, `Inspection #${item.id}`),
        h("span", { class: "spacer" }),
        h("a", { class: "btn", href: "#/feed" }, "← Feed"),
        h("a", { class: "btn", href: "#/review" }, "Review queue")),
      inspectionView(shown, item, { onVerdict: show, keys: true }));
  };
  show(insp);
}

// The viewer: input image, heatmap layer (opacity from the slider) and region boxes, in input pixel coordinates.
function viewer(ctx, insp) {
  const { width: w, height: hgt } = insp;
  const stored = settings.get("opacity");
  const opacity = stored === "" ? 50 : Number(stored);
  const base = insp.image_stored
    ? imgOr(imageUrl(insp.id, "image"), `input of inspection ${insp.id}`, "input image not available", { class: "layer base" })
    : h("div", { class: "base-missing" }, "the input image was not stored (heatmap only)");
  const heat = h("img", { class: "layer heat", src: imageUrl(insp.id, "heatmap"), alt: "anomaly heatmap",
    style: `opacity:${insp.image_stored ? opacity / 100 : 1}` });
  heat.addEventListener("error", () => heat.replaceWith(h("div", { class: "base-missing" }, "heatmap not available")), { once: true });
  const boxes = insp.regions.map((r, i) => {
    const [x0, y0, x1, y1] = r.box;
    const top = r.types && r.types.length ? r.types[0].name : "";
    return h("div", {
      class: `box${y0 / hgt < 0.08 ? " inside" : ""}`, // no room above: the label goes inside
      style: `left:${(100 * x0) / w}%;top:${(100 * y0) / hgt}%;width:${(100 * (x1 - x0)) / w}%;height:${(100 * (y1 - y0)) / hgt}%`,
    }, h("span", { class: "box-label" }, `${i + 1}${top ? ` ${top}` : ""}`));
  });
  const stage = h("div", { class: "viewer", style: `aspect-ratio:${w} / ${hgt};width:min(100%, calc((100vh - 190px) * ${w / hgt}))` }, base, heat, boxes);
  const slider = h("input", { type: "range", min: 0, max: 100, value: opacity, id: "opacity", "aria-label": "heatmap opacity",
    disabled: !insp.image_stored });
  const label = h("span", { class: "num" }, `${opacity} %`);
  slider.addEventListener("input", () => {
    heat.style.opacity = slider.value / 100;
    label.textContent = `${slider.value} %`;
    settings.set("opacity", slider.value);
  });
  const boxToggle = h("input", { type: "checkbox", checked: true, id: "show-boxes" });
  boxToggle.addEventListener("change", () => boxes.forEach((b) => { b.style.display = boxToggle.checked ? "" : "none"; }));
  return h("div", {},
    stage,
    h("div", { class: "viewer-controls" },
      h("label", { class: "check" }, "Heatmap", slider, label),
      h("label", { class: "check" }, boxToggle, `Region boxes (${insp.regions.length})`),
      h("span", { class: "spacer" }),
      insp.image_stored ? h("a", { href: imageUrl(insp.id, "image"), target: "_blank" }, "input") : null,
      h("a", { href: imageUrl(insp.id, "heatmap"), target: "_blank" }, "heatmap"),
      insp.image_stored ? h("a", { href: imageUrl(insp.id, "overlay", { alpha: 0.5 }), target: "_blank" }, "overlay") : null));
}

function gauge(insp) {
  if (insp.score_normalized === null || insp.score_normalized === undefined) return null;
  const x = Math.min(1, Math.max(0, insp.score_normalized));
  return h("div", {},
    h("div", { class: "gauge", title: `normalized score ${insp.score_normalized.toFixed(3)} (0.5 = the threshold)` },
      h("span", { class: "mid" }), h("span", { class: "mark", style: `left:${100 * x}%` })),
    h("div", { class: "gauge-legend" }, h("span", {}, "normal"), h("span", {}, "threshold"), h("span", {}, "defect")));
}

const CROP = 72; // px: the side of a region's crop and of its closest normal patch in the table

// The region cut out of the stored input (a CSS crop of image.png), scaled to fit CROP x CROP.
function regionCrop(insp, box) {
  const [x0, y0, x1, y1] = box;
  const scale = CROP / Math.max(1, x1 - x0, y1 - y0);
  return h("div", {
    class: "crop", title: "the region in the input",
    style: `width:${CROP}px;height:${CROP}px;background-image:url("${imageUrl(insp.id, "image")}");`
      + `background-size:${insp.width * scale}px ${insp.height * scale}px;`
      + `background-position:${-x0 * scale + (CROP - (x1 - x0) * scale) / 2}px ${-y0 * scale + (CROP - (y1 - y0) * scale) / 2}px`,
  });
}

// Each region: where, how large, the ranked defect types, and beside its crop the closest normal reference patch.
function regionsTable(insp) {
  if (!insp.regions.length) return h("p", { class: "muted" }, "No anomalous region above the threshold.");
  return h("table", { class: "regions" },
    h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "where"), h("th", { class: "num" }, "share"),
      h("th", {}, "most likely types"), h("th", {}, "region · closest normal patch"))),
    h("tbody", {}, insp.regions.map((r, i) => h("tr", { "data-region": i },
      h("td", {}, String(i + 1)),
      h("td", {}, r.location || "–"),
      h("td", { class: "num" }, fmtPct(r.share, r.share < 0.1 ? 1 : 0)),
      h("td", {}, r.types && r.types.length
        ? r.types.slice(0, 3).map((t, j) => [j ? ", " : "", h("b", {}, t.name), ` ${t.score.toFixed(2)}`])
        : h("span", { class: "muted" }, "not ranked by this detector")),
      h("td", {}, i < 4 ? h("div", { class: "nearest" },
        insp.image_stored ? regionCrop(insp, r.box) : null,
        h("a", { href: imageUrl(insp.id, "nearest", { region: i }), target: "_blank" },
          imgOr(imageUrl(insp.id, "nearest", { region: i }), `closest normal patch of region ${i + 1}`, "none",
            { class: "nearest-img", width: CROP, height: CROP }))) : h("span", { class: "muted" }, "–"))))));
}

// The verdict form: two big buttons (normal / defect) that save with the optional fields below them.
function verdictPanel(ctx, insp, onVerdict, keys) {
  const v = insp.verdict;
  const types = [...new Set(insp.regions.flatMap((r) => (r.types || []).map((t) => t.name)))];
  const listId = `types-${insp.id}`;
  const typeInput = h("input", { type: "text", id: "defect-type", list: listId, placeholder: types[0] || "e.g. scratch",
    value: v && v.defect_type ? v.defect_type : "" });
  let rating = v && v.rating ? v.rating : null;
  const ratingButtons = [1, 2, 3, 4, 5].map((n) => h("button", {
    type: "button", "aria-pressed": String(rating === n), "data-rating": n,
    title: `localization ${n} of 5`, onclick: () => setRating(rating === n ? null : n) }, String(n)));
  const setRating = (n) => {
    rating = n;
    ratingButtons.forEach((b, i) => b.setAttribute("aria-pressed", String(rating === i + 1)));
  };
  const noteInput = h("textarea", { id: "verdict-note", rows: 2, placeholder: "optional" });
  noteInput.value = v && v.note ? v.note : "";
  const operatorInput = h("input", { type: "text", id: "operator", value: settings.get("operator"), placeholder: "your name",
    autocomplete: "name" });
  operatorInput.addEventListener("change", () => settings.set("operator", operatorInput.value.trim()));
  const status = h("div", {});
  const normalBtn = h("button", { type: "button", class: "btn btn-normal btn-big", id: "verdict-normal" }, "✓ Normal", keys ? h("kbd", {}, "n") : null);
  const defectBtn = h("button", { type: "button", class: "btn btn-defect btn-big", id: "verdict-defect" }, "✗ Defect", keys ? h("kbd", {}, "d") : null);

  async function submit(verdict) {
    const operator = operatorInput.value.trim();
    settings.set("operator", operator);
    const body = {
      verdict,
      defect_type: verdict === "defect" ? typeInput.value.trim() || null : null,
      rating,
      note: noteInput.value.trim() || null,
      operator: operator || null,
    };
    normalBtn.disabled = defectBtn.disabled = true;
    status.replaceChildren(h("span", { class: "muted" }, h("span", { class: "spinner" }), " saving…"));
    try {
      const updated = await ctx.post(`/inspections/${insp.id}/verdict`, body);
      flash(`Inspection #${insp.id}: verdict ${verdict} saved`);
      onVerdict(updated, verdict);
    } catch (err) {
      if (err.name === "AbortError") return;
      normalBtn.disabled = defectBtn.disabled = false;
      status.replaceChildren(errorBox(err));
    }
  }
  normalBtn.addEventListener("click", () => submit("normal"));
  defectBtn.addEventListener("click", () => submit("defect"));

  if (keys) {
    ctx.on(document, "keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
      if (e.target.closest && e.target.closest("input, textarea, select")) return;
      if (e.key === "n" && !normalBtn.disabled) { e.preventDefault(); submit("normal"); }
      else if (e.key === "d" && !defectBtn.disabled) { e.preventDefault(); submit("defect"); }
      else if (/^[1-5]$/.test(e.key)) { e.preventDefault(); setRating(Number(e.key)); }
    });
  }

  const current = v
    ? h("div", { class: "current-verdict" }, verdictBadge(v),
      ` by ${v.operator || "an unnamed operator"}, ${fmtTime(v.created)}`,
      v.rating ? `, localization ${v.rating}/5` : "", v.note ? h("div", { class: "muted" }, `“${v.note}”`) : null)
    : h("div", { class: "current-verdict muted" }, "No verdict yet.");
  return h("section", { class: "panel verdict-panel", id: "verdict" },
    h("h2", {}, "Operator verdict"),
    current,
    h("div", { class: "btn-row" }, normalBtn, defectBtn),
    h("div", { class: "verdict-grid" },
      h("label", { class: "field" }, h("span", {}, "Defect type (if defect)"), typeInput,
        h("datalist", { id: listId }, types.map((t) => h("option", { value: t })))),
      h("div", { class: "field" }, h("span", {}, "Localization 1-5"), h("div", { class: "rating", role: "group", "aria-label": "localization rating" }, ratingButtons)),
      h("label", { class: "field wide" }, h("span", {}, "Note"), noteInput),
      h("label", { class: "field" }, h("span", {}, "Operator"), operatorInput)),
    status,
    keys ? h("div", { class: "keys" }, "Keys: ", h("kbd", {}, "n"), " normal, ", h("kbd", {}, "d"), " defect, ",
      h("kbd", {}, "1"), "-", h("kbd", {}, "5"), " localization rating.") : null);
}

const ms = (x) => (x === undefined || x === null ? "–" : x < 10 ? x.toFixed(1) : x.toFixed(0));

export function inspectionView(ctx, insp, { onVerdict = () => {}, keys = false } = {}) {
  const t = insp.timings_ms || {};
  const tags = [
    insp.uncertain ? h("span", { class: "tag tag-uncertain", title: "normalized score between 0.4 and 0.6" }, "uncertain") : null,
    insp.taught_in_version ? h("span", { class: "tag tag-taught" }, `taught in v${insp.taught_in_version}`) : null,
    verdictBadge(insp.verdict),
  ];
  return h("div", { class: "insp", "data-id": insp.id },
    h("div", { class: "panel" }, viewer(ctx, insp)),
    h("div", {},
      h("section", { class: "panel" },
        h("div", { class: "headline" },
          decisionBadge(insp.decision, { big: true }),
          h("span", { class: "score", id: "score", title: "anomaly score" }, fmtScore(insp.score)),
          h("span", { class: "muted" }, insp.threshold === null ? "no threshold" : `threshold ${fmtScore(insp.threshold)}`),
          tags),
        gauge(insp),
        h("p", { class: "sentence", id: "sentence" }, insp.sentence || "(no explanation)")),
      verdictPanel(ctx, insp, onVerdict, keys),
      h("section", { class: "panel", style: "margin-top:1rem" },
        h("h3", { style: "margin-top:0" }, "Regions"),
        regionsTable(insp),
        insp.regions.length ? h("p", { class: "muted", style: "font-size:.8rem;margin:.4rem 0 0" },
          "Beside each region, the most similar patch of the model's normal references.") : null,
        h("h3", {}, "Details"),
        h("dl", { class: "facts" },
          fact("model", `${insp.model} v${insp.model_version}`),
          fact("created", fmtTime(insp.created)),
          fact("source", insp.source || "–"),
          fact("size", `${insp.width} × ${insp.height} px`),
          fact("normalized", insp.score_normalized === null ? "–" : insp.score_normalized.toFixed(3)),
          fact("time", `${ms(t.total)} ms (${["decode", "queue", "predict", "explain", "save"].filter((k) => k in t).map((k) => `${k} ${ms(t[k])}`).join(", ")})`),
          fact("sha256", h("span", { class: "mono", title: insp.image_sha256 }, `${(insp.image_sha256 || "").slice(0, 16)}…`))))));
}
