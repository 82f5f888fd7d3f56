// The inspection station's web app: one page, hash routes (#/feed, #/inspection/12, #/review, #/threshold,
// #/models, #/rate, #/upload), each page a module with `render(view, ctx, ...args)`.
import { ApiError, get, settings } from "./api.js";
import { PageContext } from "./state.js";
import { clear, errorBox } from "./ui.js";
import * as feed from "./pages/feed.js";
import * as inspection from "./pages/inspection.js";
import * as review from "./pages/review.js";
import * as threshold from "./pages/threshold.js";
import * as models from "./pages/models.js";
import * as rate from "./pages/rate.js";
import * as upload from "./pages/upload.js";

const ROUTES = { feed, inspection, review, threshold, models, rate, upload };

let page = null;

async function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  const name = parts[0] || "feed";
  const module = ROUTES[name];
  if (!module) { location.replace("#/feed"); return; }
  if (page) page.dispose();
  page = new PageContext();
  const ctx = page;
  const view = clear(document.getElementById("view"));
  document.body.dataset.page = name;
  delete view.dataset.ready;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.route === (name === "inspection" ? "feed" : name));
  }
  document.title = `${module.title || name} · clad station`;
  try {
    await module.render(view, ctx, ...parts.slice(1).map(decodeURIComponent));
  } catch (err) {
    if (err.name === "AbortError" || !ctx.alive) return;
    if (!(err instanceof ApiError)) console.error(err); // a bug; the API's own refusals are shown, not logged
    view.append(errorBox(err instanceof ApiError ? err : new ApiError(0, `The page failed: ${err.message}`),
      () => route()));
  }
  if (ctx.alive) view.dataset.ready = "1";
}

// The readiness pill in the top bar: ready, loading (503) or unreachable.
async function pollReady() {
  const pill = document.getElementById("ready");
  try {
    const r = await get("/ready");
    pill.textContent = r.ready ? "ready" : "loading";
    pill.className = `pill ${r.ready ? "pill-ok" : "pill-warn"}`;
    pill.title = r.models ? `models: ${r.models.map((m) => (typeof m === "string" ? m : m.name)).join(", ")}` : "";
  } catch (err) {
    const loading = err.status === 503;
    pill.textContent = loading ? "loading" : "offline";
    pill.className = `pill ${loading ? "pill-warn" : "pill-bad"}`;
    pill.title = err.detail || "";
  }
}

function setupKeyField() {
  const input = document.getElementById("api-key");
  input.value = settings.get("apiKey");
  const save = () => {
    settings.set("apiKey", input.value.trim());
    input.classList.toggle("has-key", Boolean(input.value.trim()));
  };
  input.addEventListener("change", save);
  input.addEventListener("keyup", save);
  input.classList.toggle("has-key", Boolean(input.value.trim()));
  input.form.addEventListener("submit", (e) => { e.preventDefault(); save(); input.blur(); });
}

setupKeyField();
window.addEventListener("hashchange", route);
route();
pollReady();
setInterval(() => { if (!document.hidden) pollReady(); }, 10000);
