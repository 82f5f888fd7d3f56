// Small DOM helpers shared by the pages. Text from the API is always set as text, never parsed as HTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.setAttribute("class", v);
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value" || k === "checked" || k === "disabled" || k === "selected") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// h("div", {class: "x", onclick: fn}, child, "text", [more]) -> HTMLElement
export const h = (tag, attrs = {}, ...children) => build(document.createElement(tag), attrs, children);
// the same for SVG elements
export const svg = (tag, attrs = {}, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function fmtScore(x) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 0.001 || a >= 1e5)) return x.toExponential(2);
  return x.toPrecision(a >= 100 ? 5 : 3);
}

export const fmtPct = (x, digits = 0) => (x === null || x === undefined || Number.isNaN(x) ? "–" : `${(100 * x).toFixed(digits)} %`);

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString();
}

export function fmtAgo(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso || "";
  const s = Math.max(0, (Date.now() - d.getTime()) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return d.toLocaleDateString();
}

// The decision as a coloured badge: defect (red), normal (green), no threshold (grey).
export function decisionBadge(decision, { big = false } = {}) {
  const cls = decision === "defect" ? "defect" : decision === "normal" ? "normal" : "none";
  const text = decision === "defect" ? "DEFECT" : decision === "normal" ? "NORMAL" : "NO THRESHOLD";
  return h("span", { class: `badge badge-${cls}${big ? " badge-big" : ""}`, "data-decision": decision || "none" }, text);
}

export function verdictBadge(verdict) {
  if (!verdict) return h("span", { class: "tag tag-open", title: "no operator verdict yet" }, "unreviewed");
  const text = verdict.verdict === "defect" && verdict.defect_type ? `defect: ${verdict.defect_type}` : verdict.verdict;
  return h("span", { class: `tag tag-${verdict.verdict}`, title: `operator verdict${verdict.operator ? ` by ${verdict.operator}` : ""}` },
    `✔ ${text}`);
}

// A red box with the API's detail sentence (and a retry button when given one).
export function errorBox(err, retry) {
  const text = err && err.detail ? err.detail : err && err.message ? err.message : String(err);
  return h("div", { class: "error", role: "alert" },
    h("strong", {}, err && err.status ? `Error ${err.status}: ` : "Error: "), text,
    retry ? h("button", { class: "btn btn-small", onclick: retry }, "Retry") : null);
}

export function note(text, cls = "muted") {
  return h("p", { class: cls }, text);
}

// A transient message at the top of the page.
export function flash(text, kind = "ok", ms = 3500) {
  const host = document.getElementById("flash");
  if (!host) return;
  while (host.children.length >= 3) host.firstChild.remove(); // the latest few only
  const el = h("div", { class: `flash flash-${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  host.append(el);
  setTimeout(() => el.remove(), ms);
}

// <img> that shows a short text instead when the image does not exist (e.g. 404 nearest patch).
export function imgOr(src, alt, fallbackText, attrs = {}) {
  const img = h("img", { src, alt, loading: "lazy", ...attrs });
  img.addEventListener("error", () => img.replaceWith(h("div", { class: "img-missing" }, fallbackText)), { once: true });
  return img;
}

// A labelled value for the facts grids.
export const fact = (label, value, attrs = {}) => [h("dt", {}, label), h("dd", attrs, value)];
