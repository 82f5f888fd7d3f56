// Ad-hoc checks: drop images (or choose them) and see each one's result; they are inspected one after the other.
import { imageUrl, query } from "../api.js";
import { modelPicker } from "../state.js";
import { decisionBadge, errorBox, fmtScore, h, imgOr } from "../ui.js";

export const title = "Upload";

export async function render(view, ctx) {
  const picker = await modelPicker(() => {}, { id: "upload-model" });
  const source = h("input", { type: "text", id: "upload-source", value: "upload", "aria-label": "source" });
  const fileInput = h("input", { type: "file", id: "upload-file", multiple: true, accept: "image/*,.tif,.tiff,.bmp,.webp", style: "display:none" });
  const chooseBtn = h("button", { type: "button", class: "btn btn-primary", onclick: () => fileInput.click() }, "Choose images…");
  const zone = h("div", { class: "dropzone", id: "dropzone" },
    h("p", { class: "big" }, "Drop images here"),
    h("p", { class: "muted" }, "PNG, JPEG, BMP, TIFF or WebP; each is inspected with the chosen model and stored in the history."),
    h("p", {}, chooseBtn), fileInput);
  const results = h("div", { class: "results", id: "upload-results" });
  view.append(
    h("div", { class: "toolbar" }, h("h1", { style: "margin:0" }, "Ad-hoc check"), picker.element,
      h("label", { class: "field" }, h("span", {}, "Source"), source)),
    picker.list.length ? zone : h("div", { class: "empty" }, "No model is loaded."),
    results);

  let chain = Promise.resolve(); // one upload at a time, in the order given
  function enqueue(files) {
    for (const file of files) {
      const row = h("div", { class: "panel result", "data-file": file.name },
        h("div", { class: "img-missing" }, h("span", { class: "spinner" })),
        h("div", {}, h("div", { class: "name" }, file.name), h("p", { class: "muted" }, "waiting…")));
      results.prepend(row);
      chain = chain.then(() => inspect(file, row));
    }
  }

  async function inspect(file, row) {
    if (!ctx.alive) return;
    const model = picker.value();
    row.lastChild.lastChild.textContent = `inspecting with ${model}…`;
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const insp = await ctx.post(`/models/${encodeURIComponent(model)}/inspect${query({ source: source.value.trim() })}`, form);
      const src = insp.image_stored ? imageUrl(insp.id, "overlay", { alpha: 0.45 }) : imageUrl(insp.id, "heatmap");
      row.dataset.id = insp.id;
      row.replaceChildren(
        h("a", { href: `#/inspection/${insp.id}` }, imgOr(src, `result of ${file.name}`, "no image")),
        h("div", {},
          h("div", { class: "name" }, file.name),
          h("div", { class: "headline", style: "margin:.4rem 0" }, decisionBadge(insp.decision, { big: true }),
            h("span", { class: "score" }, fmtScore(insp.score)),
            h("span", { class: "muted" }, insp.threshold === null ? "no threshold" : `threshold ${fmtScore(insp.threshold)}`),
            insp.uncertain ? h("span", { class: "tag tag-uncertain" }, "uncertain") : null),
          h("p", { class: "sentence" }, insp.sentence),
          h("a", { class: "btn", href: `#/inspection/${insp.id}` }, `Open inspection #${insp.id} →`)));
    } catch (err) {
      if (err.name === "AbortError") return;
      row.dataset.error = String(err.status || 0);
      row.replaceChildren(h("div", { class: "img-missing" }, "not inspected"),
        h("div", {}, h("div", { class: "name" }, file.name), errorBox(err)));
    }
  }

  fileInput.addEventListener("change", () => { enqueue([...fileInput.files]); fileInput.value = ""; });
  for (const ev of ["dragenter", "dragover"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    zone.addEventListener(ev, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => enqueue([...e.dataTransfer.files]));
  // a file dropped outside the zone must not navigate away from the app
  ctx.on(window, "dragover", (e) => e.preventDefault());
  ctx.on(window, "drop", (e) => e.preventDefault());
}
