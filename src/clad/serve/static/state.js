// What the pages share: the page context (fetches, timers and listeners dropped when the route changes) and the
// list of models with its picker.
import { get, post, settings } from "./api.js";
import { h } from "./ui.js";

// What a page may hold while it is shown: fetches, timers and listeners, all dropped when the route changes.
export class PageContext {
  constructor() {
    this.controller = new AbortController();
    this.cleanups = [];
  }
  get signal() { return this.controller.signal; }
  get alive() { return !this.controller.signal.aborted; }
  get(path) { return get(path, { signal: this.signal }); }
  post(path, body) { return post(path, body, { signal: this.signal }); }
  // Run fn every ms milliseconds (after the previous run ends), paused while the tab is hidden.
  every(ms, fn) {
    let timer = null;
    const loop = async () => {
      if (!this.alive) return;
      if (!document.hidden) {
        try { await fn(); } catch (err) { if (err.name !== "AbortError") console.error(err); }
      }
      if (this.alive) timer = setTimeout(loop, ms);
    };
    timer = setTimeout(loop, ms);
    this.cleanups.push(() => clearTimeout(timer));
  }
  on(target, event, fn) {
    target.addEventListener(event, fn);
    this.cleanups.push(() => target.removeEventListener(event, fn));
  }
  dispose() {
    this.controller.abort();
    for (const fn of this.cleanups.splice(0)) fn();
  }
}

// The list of models, fetched once per page view and shared by the pages' model pickers.
let modelsPromise = null;
export function loadModels(force = false) {
  if (force || !modelsPromise) {
    modelsPromise = get("/models").catch((err) => { modelsPromise = null; throw err; });
  }
  return modelsPromise;
}

// <select> of the loaded models, remembering the choice; `all` adds an "all models" entry (a filter).
export async function modelPicker(onChange, { all = false, id = "model-select" } = {}) {
  const list = await loadModels();
  const key = all ? "filterModel" : "model"; // a filter of the feed and the queue is not the model to upload to
  const stored = settings.get(key);
  const names = list.map((m) => m.name);
  let current = all ? (names.includes(stored) ? stored : "") : (names.includes(stored) ? stored : names[0] || "");
  const select = h("select", { id, "aria-label": "model" },
    all ? h("option", { value: "" }, "all models") : null,
    list.map((m) => h("option", { value: m.name }, `${m.name} (${m.detector})`)));
  select.value = current;
  select.addEventListener("change", () => {
    current = select.value;
    settings.set(key, current);
    onChange(current);
  });
  return { element: h("label", { class: "field" }, h("span", {}, "Model"), select), value: () => current, list };
}
