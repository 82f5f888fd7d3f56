// The station's HTTP API (v1): one fetch wrapper that sends the API key on writes and turns every failure into an
// ApiError carrying the server's `detail` sentence; and the few settings the browser remembers (localStorage).

export const BASE = "/api/v1";

// stored as "clad.<name>": apiKey, operator, rater, model (upload, threshold), filterModel (feed, review), ...
export const settings = {
  get(name) {
    try { return localStorage.getItem(`clad.${name}`) || ""; } catch { return ""; }
  },
  set(name, value) {
    try {
      if (value) localStorage.setItem(`clad.${name}`, value);
      else localStorage.removeItem(`clad.${name}`);
    } catch { /* storage disabled: the value lasts until the page reloads */ }
  },
};

export class ApiError extends Error {
  constructor(status, detail, retryAfter = null) {
    super(detail);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

// FastAPI's validation errors carry a list of {loc, msg}; the station's own errors one sentence.
function detailText(body, res) {
  const d = body && body.detail;
  if (typeof d === "string" && d) return d;
  if (Array.isArray(d) && d.length) {
    return d.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".") || "request"}: ${e.msg}`).join("; ");
  }
  return `${res.status} ${res.statusText || "error"}`.trim();
}

// Hints for the statuses an operator can act on, added after the server's own sentence.
function hint(status, retryAfter) {
  if (status === 401) return " Enter the station's API key in the key field at the top right.";
  if (status === 503 && retryAfter) return ` Try again in ${retryAfter} s.`;
  return "";
}

export async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") {
    const key = settings.get("apiKey");
    if (key) headers["X-API-Key"] = key;
  }
  let payload = body;
  if (body !== undefined && !(body instanceof FormData) && !(body instanceof Blob)) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(BASE + path, { method, headers, body: payload, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "The station does not answer: is `clad serve` still running?");
  }
  if (res.status === 204) return null;
  let data = null;
  const text = await res.text();
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const retryAfter = res.headers.get("Retry-After");
    const detail = detailText(data, res);
    const extra = hint(res.status, retryAfter);
    throw new ApiError(res.status, extra && !/[.!?]$/.test(detail) ? `${detail}.${extra}` : detail + extra, retryAfter);
  }
  if (data === null && text) throw new ApiError(res.status, `The station answered ${path} with something that is not JSON.`);
  return data;
}

export const get = (path, opts = {}) => api(path, opts);
export const post = (path, body, opts = {}) => api(path, { ...opts, method: "POST", body });

export function query(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== "") q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : "";
}

export const imageUrl = (id, kind, params = {}) => `${BASE}/inspections/${id}/${kind}.png${query(params)}`;
