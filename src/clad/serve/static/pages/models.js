// The models: each with its versions (reason, threshold, references), teaching the confirmed normals, rollback.
import { query } from "../api.js";
import { loadModels } from "../state.js";
import { errorBox, fact, flash, fmtScore, fmtTime, h } from "../ui.js";

export const title = "Models";

const REASONS = { initial: "as loaded", threshold: "new threshold", teach: "taught normals", rollback: "rollback" };
const SOURCES = { references: "label-free, from the references", user: "set by an operator" };

export async function render(view, ctx) {
  const host = h("div", { id: "models" });
  view.append(h("div", { class: "toolbar" }, h("h1", { style: "margin:0" }, "Models"), h("span", { class: "spacer" }),
    h("button", { class: "btn", onclick: () => load() }, "Refresh")), host);

  async function load() {
    const list = await loadModels(true);
    if (!ctx.alive) return;
    if (!list.length) { host.replaceChildren(h("div", { class: "empty" }, "No model is loaded.")); return; }
    const cards = list.map((m) => h("section", { class: "panel model-card", "data-model": m.name }));
    host.replaceChildren(...cards);
    await Promise.all(list.map((m, i) => fillCard(cards[i], m)));
  }

  // Confirmed normals of this model that can still be taught (verdict normal, image stored, not taught yet).
  async function pending(name) {
    const data = await ctx.get(`/inspections${query({ model: name, verdict: "normal", limit: 200 })}`);
    const n = data.items.filter((i) => i.image_stored && !i.taught_in_version).length;
    return { n, more: data.total > data.items.length };
  }

  async function fillCard(card, m) {
    let todo = null, todoError = null;
    try { todo = await pending(m.name); } catch (err) { if (err.name === "AbortError") return; todoError = err; }
    const teachBtn = h("button", { class: "btn btn-primary", "data-action": "teach",
      disabled: !m.can_add_references || (todo && todo.n === 0),
      title: m.can_add_references ? "add the confirmed normals to the references and write a new version" : `${m.detector} cannot add references without a refit` },
    "Teach confirmed normals");
    const teachStatus = h("div", { class: "teach-result" });
    teachBtn.addEventListener("click", async () => {
      teachBtn.disabled = true;
      teachStatus.replaceChildren(h("span", { class: "muted" }, h("span", { class: "spinner" }), " teaching…"));
      try {
        const r = await ctx.post(`/models/${encodeURIComponent(m.name)}/teach`, { inspection_ids: null });
        flash(`${m.name}: taught ${r.taught} normal image${r.taught === 1 ? "" : "s"}, version ${r.model.version} active`);
        await fillCard(card, r.model);
        card.querySelector(".teach-result").replaceChildren(h("p", { class: "ok", id: `taught-${m.name}` },
          `Taught ${r.taught} image${r.taught === 1 ? "" : "s"} in ${r.seconds.toFixed(2)} s: version ${r.model.version} is active with ${r.model.n_references ?? "?"} references.`));
      } catch (err) {
        if (err.name === "AbortError") return;
        teachBtn.disabled = false;
        teachStatus.replaceChildren(errorBox(err));
      }
    });

    const versions = [...m.versions].sort((a, b) => b.version - a.version);
    const rows = versions.map((v) => {
      let armed = false;
      const btn = v.active ? h("span", { class: "tag tag-normal" }, "active")
        : h("button", { class: "btn btn-small btn-warn", "data-action": "rollback", "data-version": v.version }, `Roll back to v${v.version}`);
      if (!v.active) {
        btn.addEventListener("click", async () => {
          if (!armed) { // a second click confirms, so a stray click changes nothing
            armed = true;
            btn.textContent = `Confirm: make v${v.version} active`;
            setTimeout(() => { armed = false; if (btn.isConnected && !btn.disabled) btn.textContent = `Roll back to v${v.version}`; }, 4000);
            return;
          }
          btn.disabled = true;
          try {
            const updated = await ctx.post(`/models/${encodeURIComponent(m.name)}/rollback`, { version: v.version });
            flash(`${m.name}: version ${v.version} is active again${updated.version === v.version ? "" : ` (as v${updated.version})`}`);
            await fillCard(card, updated);
          } catch (err) {
            if (err.name === "AbortError") return;
            btn.disabled = false;
            teachStatus.replaceChildren(errorBox(err));
          }
        });
      }
      return h("tr", { class: v.active ? "active" : "", "data-version": v.version },
        h("td", { class: "num" }, `v${v.version}`),
        h("td", {}, fmtTime(v.created)),
        h("td", {}, REASONS[v.reason] || v.reason, v.parent ? h("span", { class: "muted" }, ` (from v${v.parent})`) : null),
        h("td", { class: "num" }, v.threshold === null ? "–" : fmtScore(v.threshold)),
        h("td", { class: "num" }, v.n_references ?? "–"),
        h("td", {}, btn));
    });

    const todoText = todoError ? errorBox(todoError)
      : h("p", { class: "muted", id: `pending-${m.name}` },
        !m.can_add_references ? `${m.detector} cannot learn new references without a refit from scratch.`
          : todo.n ? `${todo.n}${todo.more ? "+" : ""} confirmed normal image${todo.n === 1 ? "" : "s"} ready to teach.`
            : "No confirmed normal waiting: give normal verdicts on the review page first.");

    card.replaceChildren(
      h("div", { class: "model-head" },
        h("h2", {}, m.name),
        h("span", { class: "tag tag-open" }, m.detector),
        h("span", { class: "muted" }, `version ${m.version} active`),
        m.ready === false ? h("span", { class: "tag tag-uncertain" }, "loading") : null),
      h("div", { class: "model-body" },
        h("div", {},
          h("dl", { class: "facts" },
            fact("active version", h("b", { class: "active-version" }, `v${m.version}`)),
            fact("threshold", m.threshold === null ? "none" : `${fmtScore(m.threshold)}${m.threshold_source ? ` (${SOURCES[m.threshold_source] || m.threshold_source})` : ""}`),
            fact("references", m.n_references ?? "–"),
            fact("learns from verdicts", m.can_add_references ? "yes" : "no")),
          h("h3", {}, "Teach"),
          todoText,
          teachBtn,
          teachStatus),
        h("div", {},
          h("h3", { style: "margin-top:0" }, "Versions"),
          h("table", { class: "versions" },
            h("thead", {}, h("tr", {}, h("th", { class: "num" }, "version"), h("th", {}, "created"), h("th", {}, "reason"),
              h("th", { class: "num" }, "threshold"), h("th", { class: "num" }, "references"), h("th", {}))),
            h("tbody", {}, rows)))));
  }

  await load();
}
