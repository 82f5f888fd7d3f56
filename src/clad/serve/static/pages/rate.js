// Blind rating (the paper's Table 3): the same defective image under every loaded model's heatmap, shown as
// options A, B, ... in a shuffled order with no model name; the rater gives each a 1-5 localization score.
import { BASE, query, settings } from "../api.js";
import { errorBox, h } from "../ui.js";

export const title = "Blind rating";

export async function render(view, ctx) {
  const raterInput = h("input", { type: "text", id: "rater", placeholder: "your name", value: settings.get("rater") || settings.get("operator") });
  const startBtn = h("button", { class: "btn btn-primary", id: "rate-start" }, "Start rating");
  const host = h("div", { id: "rate-task" });
  let done = 0;
  view.append(
    h("div", { class: "toolbar" },
      h("h1", { style: "margin:0" }, "Blind rating"),
      h("label", { class: "field" }, h("span", {}, "Rater"), raterInput),
      startBtn,
      h("span", { class: "spacer" }),
      h("a", { class: "btn", id: "ratings-export", href: `${BASE}/ratings/export`, download: "" }, "⤓ Export ratings (CSV sheets + key, zip)")),
    h("p", { class: "muted rate-intro" },
      "Each option is the heatmap of one detector over the same defective image; which detector is hidden and the order ",
      "is shuffled. Rate how well each map points at the defect: 1 = misses it, 3 = partly, 5 = exactly on it. ",
      "The export is the sheet format that ", h("code", {}, "clad bench --ratings"), " reads."),
    host);

  startBtn.addEventListener("click", () => next());
  raterInput.addEventListener("keydown", (e) => { if (e.key === "Enter") next(); });

  async function next() {
    const rater = raterInput.value.trim();
    if (!rater) { host.replaceChildren(errorBox({ detail: "Enter your name as rater first: ratings are kept per rater." })); raterInput.focus(); return; }
    settings.set("rater", rater);
    host.replaceChildren(h("p", { class: "muted" }, h("span", { class: "spinner" }), " loading…"));
    let data;
    try {
      data = await ctx.get(`/ratings/next${query({ rater })}`);
    } catch (err) {
      if (err.name === "AbortError") return;
      host.replaceChildren(errorBox(err, () => next()));
      return;
    }
    if (!data.task) {
      host.replaceChildren(h("div", { class: "empty", id: "rate-done" },
        h("b", {}, `Nothing left to rate for ${rater}.`), done ? ` You rated ${done} image${done === 1 ? "" : "s"} in this session.` : "",
        h("br"), "Every stored inspection decided as a defect has your rating. ",
        h("a", { href: `${BASE}/ratings/export`, download: "" }, "Export the ratings"), "."));
      return;
    }
    showTask(rater, data.task);
  }

  function showTask(rater, task) {
    const ratings = {};
    const submit = h("button", { class: "btn btn-primary btn-big", id: "rate-submit", disabled: true, style: "flex:0 0 auto" }, "Save ratings and next →");
    const status = h("div", {});
    const options = task.options.map((o) => {
      const box = h("div", { class: "option", "data-option": o.option });
      const buttons = [1, 2, 3, 4, 5].map((n) => h("button", { type: "button", "aria-pressed": "false", "data-rating": n,
        title: `${n} of 5`, onclick: () => {
          ratings[o.option] = n;
          buttons.forEach((b, i) => b.setAttribute("aria-pressed", String(i + 1 === n)));
          box.classList.add("rated");
          submit.disabled = Object.keys(ratings).length !== task.options.length;
        } }, String(n)));
      box.append(h("div", { class: "letter" }, o.option),
        h("img", { src: o.url, alt: `option ${o.option}`, style: "width:100%;border-radius:4px;display:block" }),
        h("div", { class: "rating", role: "group", "aria-label": `rating of option ${o.option}` }, buttons));
      return box;
    });
    submit.addEventListener("click", async () => {
      submit.disabled = true;
      status.replaceChildren(h("span", { class: "muted" }, h("span", { class: "spinner" }), " saving…"));
      try {
        for (const o of task.options) {
          await ctx.post("/ratings", { inspection_id: task.inspection_id, option: o.option, rating: ratings[o.option], rater });
        }
        done++;
        next();
      } catch (err) {
        if (err.name === "AbortError") return;
        submit.disabled = false;
        status.replaceChildren(errorBox(err));
      }
    });
    host.replaceChildren(h("div", { class: "rate-task", "data-inspection": task.inspection_id },
      h("div", { class: "panel" }, h("h3", { style: "margin-top:0" }, "The image"), h("img", { src: task.image_url, alt: "the inspected image" }),
        h("p", { class: "muted", style: "font-size:.85rem" }, `Rated by ${rater} in this session: ${done}.`)),
      h("div", {}, h("div", { class: "options" }, options),
        h("div", { class: "btn-row", style: "margin-top:1rem;justify-content:flex-end" }, submit), status)));
  }

  if (raterInput.value.trim()) await next();
}
