// The threshold page: the score histogram coloured by the operators' verdicts, a candidate threshold (slider or a
// drag on the histogram) with live TP / FP / FN / TN, precision and recall against the current one; "apply" saves
// it as a new model version. Flagged = score > threshold, as the detectors decide.
import { flash, errorBox, fmtPct, fmtScore, h, svg } from "../ui.js";
import { loadModels, modelPicker } from "../state.js";

export const title = "Threshold";
const W = 820, H = 300, M = { left: 44, right: 16, top: 26, bottom: 34 };
const BINS = 32;

export function confusion(items, t) {
  const c = { tp: 0, fp: 0, fn: 0, tn: 0, open: 0, openFlagged: 0 };
  for (const it of items) {
    const flagged = it.score > t;
    if (it.verdict === "defect") flagged ? c.tp++ : c.fn++;
    else if (it.verdict === "normal") flagged ? c.fp++ : c.tn++;
    else { c.open++; if (flagged) c.openFlagged++; }
  }
  c.precision = c.tp + c.fp ? c.tp / (c.tp + c.fp) : NaN;
  c.recall = c.tp + c.fn ? c.tp / (c.tp + c.fn) : NaN;
  c.f1 = c.tp ? (2 * c.tp) / (2 * c.tp + c.fp + c.fn) : (c.tp + c.fp + c.fn ? 0 : NaN);
  return c;
}

// The threshold with the best F1 on the labelled items: midpoints between consecutive distinct scores.
function bestF1(items) {
  const labelled = items.filter((i) => i.verdict);
  const s = [...new Set(labelled.map((i) => i.score))].sort((a, b) => a - b);
  if (!s.length || !labelled.some((i) => i.verdict === "defect")) return null;
  const cands = [s[0] - Math.max(1e-6, Math.abs(s[0]) * 1e-3)];
  for (let i = 1; i < s.length; i++) cands.push((s[i - 1] + s[i]) / 2);
  let best = null;
  for (const t of cands) {
    const f = confusion(labelled, t).f1;
    if (best === null || f > best.f) best = { t, f };
  }
  return best.t;
}

function niceTicks(lo, hi, n = 6) {
  const step0 = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

export async function render(view, ctx) {
  const body = h("div", {});
  const picker = await modelPicker((m) => show(m), { id: "threshold-model" });
  view.append(h("div", { class: "toolbar" }, h("h1", { style: "margin:0" }, "Threshold"), picker.element), body);
  if (!picker.list.length) { body.append(h("div", { class: "empty" }, "No model is loaded.")); return; }

  async function show(name) {
    body.replaceChildren(h("p", { class: "muted" }, h("span", { class: "spinner" }), " loading scores…"));
    let data;
    try {
      data = await ctx.get(`/models/${encodeURIComponent(name)}/scores`);
    } catch (err) {
      if (err.name === "AbortError") return;
      body.replaceChildren(errorBox(err, () => show(name)));
      return;
    }
    draw(name, data);
  }

  function draw(name, data) {
    const items = data.items;
    const current = data.threshold;
    if (!items.length) {
      body.replaceChildren(h("div", { class: "empty" }, `No inspection of ${name} yet: the histogram fills as images are inspected.`));
      return;
    }
    const scores = items.map((i) => i.score);
    let lo = Math.min(...scores, current ?? Infinity), hi = Math.max(...scores, current ?? -Infinity);
    const pad = (hi - lo || Math.abs(hi) || 1) * 0.05;
    lo -= pad; hi += pad;
    const x = (v) => M.left + ((v - lo) / (hi - lo)) * (W - M.left - M.right);
    const xInv = (px) => lo + ((px - M.left) / (W - M.left - M.right)) * (hi - lo);
    const binW = (hi - lo) / BINS;
    const bins = Array.from({ length: BINS }, () => ({ normal: 0, defect: 0, open: 0 }));
    for (const it of items) {
      const b = Math.min(BINS - 1, Math.max(0, Math.floor((it.score - lo) / binW)));
      bins[b][it.verdict === "normal" ? "normal" : it.verdict === "defect" ? "defect" : "open"]++;
    }
    const maxCount = Math.max(1, ...bins.map((b) => b.normal + b.defect + b.open));
    const y = (c) => H - M.bottom - (c / maxCount) * (H - M.top - M.bottom);
    const bars = [];
    bins.forEach((b, i) => {
      let acc = 0;
      for (const key of ["defect", "normal", "open"]) {
        if (!b[key]) continue;
        const x0 = x(lo + i * binW) + 1, x1 = x(lo + (i + 1) * binW) - 1;
        bars.push(svg("rect", { class: `bar-${key}`, x: x0, width: Math.max(1, x1 - x0), y: y(acc + b[key]), height: y(acc) - y(acc + b[key]) },
          svg("title", {}, `${b[key]} ${key === "open" ? "unreviewed" : key}, scores ${fmtScore(lo + i * binW)}–${fmtScore(lo + (i + 1) * binW)}`)));
        acc += b[key];
      }
    });
    const ticks = niceTicks(lo, hi).map((v) => [
      svg("line", { class: "axis", x1: x(v), x2: x(v), y1: H - M.bottom, y2: H - M.bottom + 4 }),
      svg("text", { class: "tick", x: x(v), y: H - M.bottom + 17, "text-anchor": "middle" }, fmtScore(v))]);
    const yTicks = niceTicks(0, maxCount, 4).filter((v) => Number.isInteger(v)).map((v) => [
      svg("line", { x1: M.left, x2: W - M.right, y1: y(v), y2: y(v), stroke: "#eef0f3" }),
      svg("text", { class: "tick", x: M.left - 6, y: y(v) + 4, "text-anchor": "end" }, String(v))]);
    const zone = svg("rect", { class: "flag-zone", y: M.top, height: H - M.top - M.bottom });
    const lineNew = svg("line", { class: "line-new", y1: M.top - 6, y2: H - M.bottom });
    const labelNew = svg("text", { class: "line-label", y: M.top - 10, "text-anchor": "middle" });
    const curLine = current === null ? null : [
      svg("line", { class: "line-cur", x1: x(current), x2: x(current), y1: M.top, y2: H - M.bottom }),
      svg("text", { class: "line-label", x: x(current) + 4, y: H - M.bottom - 6, fill: "#b26a00" }, `current ${fmtScore(current)}`)];
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "score histogram", id: "histogram" },
      yTicks, zone, bars, ticks,
      svg("line", { class: "axis", x1: M.left, x2: W - M.right, y1: H - M.bottom, y2: H - M.bottom }),
      svg("text", { class: "tick", x: W - M.right, y: H - 2, "text-anchor": "end" }, "anomaly score →"),
      curLine, lineNew, labelNew);

    const step = (hi - lo) / 1000;
    const slider = h("input", { type: "range", id: "threshold-slider", min: lo, max: hi, step, "aria-label": "candidate threshold" });
    const number = h("input", { type: "number", id: "threshold-value", step: "any", "aria-label": "candidate threshold value" });
    const stats = h("div", { id: "threshold-stats" });
    const applyBtn = h("button", { class: "btn btn-primary", id: "threshold-apply" }, "Apply as new version");
    const applyStatus = h("div", {});
    let t = current ?? bestF1(items) ?? (lo + hi) / 2;

    function set(value, from) {
      if (!Number.isFinite(value)) return;
      t = value;
      if (from !== "slider") slider.value = Math.min(hi, Math.max(lo, t));
      if (from !== "number") number.value = Number(t.toPrecision(6));
      const px = x(Math.min(hi, Math.max(lo, t)));
      for (const [k, v] of [["x1", px], ["x2", px]]) lineNew.setAttribute(k, v);
      labelNew.setAttribute("x", px);
      labelNew.textContent = fmtScore(t);
      zone.setAttribute("x", px);
      zone.setAttribute("width", Math.max(0, W - M.right - px));
      applyBtn.disabled = current !== null && Math.abs(t - current) < 1e-12;
      stats.replaceChildren(statsView(items, t, current));
    }
    slider.addEventListener("input", () => set(Number(slider.value), "slider"));
    number.addEventListener("input", () => set(Number(number.value), "number"));
    let dragging = false;
    const fromPointer = (e) => {
      const r = chart.getBoundingClientRect();
      set(xInv(((e.clientX - r.left) / r.width) * W), "chart");
    };
    chart.addEventListener("pointerdown", (e) => { dragging = true; chart.setPointerCapture(e.pointerId); fromPointer(e); });
    chart.addEventListener("pointermove", (e) => { if (dragging) fromPointer(e); });
    chart.addEventListener("pointerup", () => { dragging = false; });

    const best = bestF1(items);
    applyBtn.addEventListener("click", async () => {
      applyBtn.disabled = true;
      applyStatus.replaceChildren(h("span", { class: "muted" }, h("span", { class: "spinner" }), " saving a new version…"));
      try {
        const model = await ctx.post(`/models/${encodeURIComponent(name)}/threshold`, { threshold: t });
        loadModels(true);
        flash(`${name}: threshold ${fmtScore(model.threshold)} active as version ${model.version}`);
        draw(name, { ...data, threshold: model.threshold });
        body.querySelector("#threshold-apply-status").replaceChildren(
          h("p", { class: "muted", id: "threshold-applied" }, `Version ${model.version} of ${name} is active with threshold ${fmtScore(model.threshold)}. `,
            h("a", { href: "#/models" }, "Models")));
      } catch (err) {
        if (err.name === "AbortError") return;
        applyBtn.disabled = false;
        applyStatus.replaceChildren(errorBox(err));
      }
    });

    const labelled = items.filter((i) => i.verdict).length;
    body.replaceChildren(h("div", { class: "thr" },
      h("section", { class: "panel histogram" },
        chart,
        h("div", { class: "legend" },
          h("span", {}, h("i", { style: "background:var(--defect)" }), "operator: defect"),
          h("span", {}, h("i", { style: "background:var(--normal)" }), "operator: normal"),
          h("span", {}, h("i", { style: "background:#b9c1cb" }), "unreviewed"),
          h("span", {}, h("i", { style: "background:var(--accent)" }), "current threshold"),
          h("span", {}, h("i", { style: "background:rgba(198,40,40,.15)" }), "flagged at the candidate")),
        h("div", { class: "slider-row" }, h("span", { class: "muted" }, "candidate"), slider, number),
        h("div", { class: "btn-row", style: "margin-top:.8rem" },
          best === null ? null : h("button", { class: "btn", id: "threshold-best", onclick: () => set(best, "button") }, `Best F1 (${fmtScore(best)})`),
          current === null ? null : h("button", { class: "btn", onclick: () => set(current, "button") }, "Back to current"),
          h("span", { class: "spacer" }),
          applyBtn),
        h("div", { id: "threshold-apply-status" }, applyStatus)),
      h("section", { class: "panel" },
        h("h2", {}, `${name}: ${items.length} inspections, ${labelled} with a verdict`),
        labelled ? null : h("p", { class: "muted" }, "No operator verdict yet: the counts below need verdicts from the ",
          h("a", { href: "#/review" }, "review queue"), "."),
        stats)));
    set(t, "init");
  }

  await show(picker.value());
}

function statsView(items, t, current) {
  const c = confusion(items, t);
  const cur = current === null ? null : confusion(items, current);
  const cell = (key, label) => h("td", { class: `cell ${key}`, id: `cm-${key}` }, String(c[key]),
    h("small", {}, label), cur && cur[key] !== c[key] ? h("small", { class: "was" }, `${cur[key]} at current`) : null);
  const stat = (key, label) => {
    const v = c[key], was = cur ? cur[key] : NaN;
    const delta = Number.isFinite(v) && Number.isFinite(was) && Math.abs(v - was) > 1e-9
      ? h("small", { class: v > was ? "delta-up" : "delta-down" }, ` ${v > was ? "+" : ""}${(100 * (v - was)).toFixed(0)} pt`) : null;
    return h("div", { class: "stat" }, h("b", { id: `stat-${key}` }, fmtPct(v), delta), h("span", {}, label));
  };
  return h("div", {},
    h("table", { class: "confusion" },
      h("thead", {}, h("tr", {}, h("th", {}), h("th", {}, "flagged defect"), h("th", {}, "passed normal"))),
      h("tbody", {},
        h("tr", {}, h("th", {}, "operator: defect"), cell("tp", "true positive"), cell("fn", "missed")),
        h("tr", {}, h("th", {}, "operator: normal"), cell("fp", "false alarm"), cell("tn", "true negative")))),
    h("div", { class: "stats" }, stat("precision", "precision"), stat("recall", "recall"), stat("f1", "F1")),
    h("p", { class: "muted", style: "font-size:.85rem;margin-top:.8rem" },
      `Unreviewed: ${c.open}, of which ${c.openFlagged} would be flagged at ${fmtScore(t)}`,
      cur ? ` (${cur.openFlagged} at the current ${fmtScore(current)}).` : "."));
}
