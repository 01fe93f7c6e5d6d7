// The feature browser's pages: render data/*.js (each calls SAE.loaded(name, payload)).
// Data scripts are loaded on demand with <script> tags, which work from file://.
"use strict";

const SAE = {
  data: {},
  waiting: {},
  loaded(name, payload) {
    this.data[name] = payload;
    (this.waiting[name] || []).forEach((resolve) => resolve(payload));
    delete this.waiting[name];
  },
  load(name) {
    if (name in this.data) return Promise.resolve(this.data[name]);
    return new Promise((resolve, reject) => {
      if (this.waiting[name]) {
        this.waiting[name].push(resolve);
        return;
      }
      this.waiting[name] = [resolve];
      const script = document.createElement("script");
      script.src = "data/" + name + ".js";
      script.onerror = () => reject(new Error("cannot load data/" + name + ".js"));
      document.head.appendChild(script);
    });
  },
};

// --- small DOM helpers ---------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const pct = (v, digits = 2) => (100 * v).toFixed(digits) + "%";
const num = (v) => (Number.isInteger(v) ? String(v) : Math.abs(v) >= 100 ? v.toFixed(1) : Math.abs(v) >= 1 ? v.toFixed(3) : v.toPrecision(3));
const latentLink = (id, text) => el("a", { href: "latent.html#" + id, class: "latent-link" }, text ?? "#" + id);
const expertLink = (e, text) => el("a", { href: "expert.html#" + e, class: "expert-link" }, text ?? "expert " + e);
const fact = (name, value) => el("span", {}, name + " ", el("b", {}, value));
const showText = (s) => s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");

// replaceChildren without the null / undefined placeholders of optional parts
function fill(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

function table(headers, rows, cls) {
  return el("table", { class: cls || "" },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

// A context: activation, then tokens shaded by the latent's activation (text data), or the
// planted features of a synthetic token, or where an activation-only token sits.
function contextRow(ctx, maxAct, vocab, match) {
  const row = el("div", { class: "ctx", "data-token": ctx.token, "data-act": ctx.act },
    el("span", { class: "act" }, num(ctx.act)));
  if (ctx.ids) {
    ctx.ids.forEach((id, i) => {
      const a = ctx.acts ? ctx.acts[i] : 0;
      const alpha = maxAct > 0 ? Math.min(1, a / maxAct) : 0;
      const span = el("span", {
        class: "tok" + (i === ctx.center ? " center" : ""),
        style: "background: rgba(249, 115, 22, " + alpha.toFixed(3) + ")",
        title: "token " + id + (a ? ", activation " + num(a) : ""),
      }, showText(vocab[id] ?? "\u2047" + id));
      row.append(span);
    });
  } else if (ctx.features) {
    row.append(el("span", {}, "planted: "));
    for (const [f, m] of ctx.features) {
      row.append(el("span", { class: "feat" + (match.has(f) ? " match" : "") }, "f" + f + " \u00d7" + m.toFixed(2)));
    }
    row.append(el("span", { class: "where" }, "group " + ctx.group + ", eval token " + ctx.token));
    return row;
  }
  const where = ctx.position === undefined ? "token " + ctx.token : "token " + ctx.token + ", position " + ctx.position;
  row.append(el("span", { class: "where" }, where));
  return row;
}

function histogram(hist, edges, width = 420, height = 110) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height + 24);
  svg.setAttribute("class", "histogram");
  if (!hist.length) return svg;
  const [first, counts] = hist;
  const top = Math.max(...counts);
  const w = width / counts.length;
  counts.forEach((c, i) => {
    const r = document.createElementNS(svg.namespaceURI, "rect");
    const h = top ? (c / top) * height : 0;
    r.setAttribute("x", i * w);
    r.setAttribute("y", height - h);
    r.setAttribute("width", Math.max(1, w - 1));
    r.setAttribute("height", h);
    r.setAttribute("fill", "#5b8def");
    r.innerHTML = "<title>" + c + "</title>";
    svg.append(r);
  });
  const label = (x, text, anchor) => {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x);
    t.setAttribute("y", height + 14);
    t.setAttribute("text-anchor", anchor);
    t.textContent = text;
    svg.append(t);
  };
  const lower = (bin) => (bin === 0 ? 0 : Math.pow(10, edges[bin - 1]));
  const upper = (bin) => (bin >= edges.length ? Infinity : Math.pow(10, edges[bin]));
  label(0, num(lower(first)), "start");
  label(width, num(upper(first + counts.length - 1)) + " (log bins)", "end");
  return svg;
}

function keyChips(keys) {
  return el("div", { class: "keys" }, keys.map(([text, count, share]) =>
    el("span", { title: count + " tokens, " + pct(share, 0) + " of this token's occurrences" },
      showText(text) + " " + count)));
}

// --- pages ---------------------------------------------------------------------------------
async function renderIndex(main) {
  const o = await SAE.load("overview");
  document.title = o.title + " \u2014 SAE browser";
  fill(main, 
    el("h1", {}, o.title),
    el("div", { class: "facts" },
      fact("data", o.data), fact("tokens", o.tokens), fact("experts", o.num_experts),
      fact("latents", o.num_latents), fact("per expert", o.latents_per_expert), fact("k", o.k),
      fact("d", o.d), fact("dead", pct(o.dead_fraction))),
    o.note ? el("p", { class: "note", id: "note" }, o.note) : null,
    el("h2", {}, "Look up"),
    el("form", { id: "latent-form", onsubmit: (ev) => {
      ev.preventDefault();
      const id = document.getElementById("latent-id").value.trim();
      if (id) location.href = "latent.html#" + parseInt(id, 10);
    } }, "latent id ", el("input", { id: "latent-id", size: 8, inputmode: "numeric" }), " ",
      el("button", { type: "submit" }, "open")),
    o.kind === "activations" ? el("span", {}, "(look-up by token text needs token ids)") : el("form", { id: "token-form", onsubmit: (ev) => {
      ev.preventDefault();
      lookUp(document.getElementById("token-text").value, o.kind);
    } }, o.kind === "synthetic" ? "planted feature (f123) " : "token text ",
      el("input", { id: "token-text", size: 16 }), " ", el("button", { type: "submit" }, "find")),
    el("div", { id: "token-results", class: "results" }),
    el("h2", {}, "Experts"),
    table(["expert", "load", "width", "dead", "dense", o.kind === "synthetic" ? "groups routed most often" : "tokens routed most often"],
      o.experts.map((e) => el("tr", {},
        el("td", {}, expertLink(e.id)),
        el("td", { class: "num" }, el("span", { class: "bar", style: "width:" + Math.round(300 * e.load) + "px" }), " ", pct(e.load, 1)),
        el("td", { class: "num" }, e.width), el("td", { class: "num" }, pct(e.dead, 1)),
        el("td", { class: "num" }, pct(e.dense, 1)), el("td", {}, keyChips(e.keys.slice(0, 6))))), "experts"),
    el("h2", {}, "Duplicated features across experts (decoder cosine > 0.9): " +
      (o.duplicates_searched ? o.duplicates.length + " pairs" : "not searched (--no_duplicates)")),
    o.duplicates.length ? table(["latent", "latent", "cosine"], o.duplicates.slice(0, 500).map(([a, b, c]) =>
      el("tr", {}, el("td", {}, latentLink(a)), el("td", {}, latentLink(b)), el("td", { class: "num" }, c.toFixed(3)))))
      : el("p", {}, "none"),
    Object.keys(o.metrics).length ? el("h2", {}, "Evaluation (launch.eval)") : null,
    Object.keys(o.metrics).length ? table(["metric", "value"], Object.entries(o.metrics).map(([k, v]) =>
      el("tr", {}, el("td", {}, k), el("td", { class: "num" }, typeof v === "number" ? num(v) : v)))) : null,
  );
}

async function lookUp(query, kind) {
  const out = document.getElementById("token-results");
  const keys = await SAE.load("keys");
  let names = Object.keys(keys).filter((k) => k === query || k.trim() === query.trim());
  if (!names.length && query.trim()) names = Object.keys(keys).filter((k) => k.includes(query.trim())).slice(0, 20);
  if (!names.length) {
    fill(out, el("p", {}, "no " + (kind === "synthetic" ? "feature" : "token") + " matches " + JSON.stringify(query)));
    return;
  }
  fill(out, table(["token", "experts (tokens routed)", "latents (times fired)"], names.map((name) =>
    el("tr", { class: "hit" }, el("td", {}, el("span", { class: "keys" }, el("span", {}, showText(name)))),
      el("td", {}, keys[name].experts.map(([e, c]) => [expertLink(e, "expert " + e), " (" + c + ") "])),
      el("td", {}, keys[name].latents.map(([l, c]) => [latentLink(l), " (" + c + ") "]))))));
}

async function renderExpert(main) {
  const o = await SAE.load("overview");
  const e = parseInt(location.hash.slice(1) || "0", 10);
  const info = o.experts[e];
  if (!info) {
    fill(main, el("p", {}, "no expert " + e), el("a", { href: "index.html" }, "overview"));
    return;
  }
  const [data, vocab] = await Promise.all([SAE.load("expert_" + e), o.kind === "text" ? SAE.load("vocab") : {}]);
  document.title = "expert " + e + " \u2014 SAE browser";
  const rows = data.latents;
  const body = el("tbody", {});
  let shown = 0;
  const more = el("button", { id: "more", onclick: () => showMore() }, "show more");
  function showMore() {
    for (const [id, freq, max, label] of rows.slice(shown, shown + 200)) {
      body.append(el("tr", {}, el("td", {}, latentLink(id)), el("td", { class: "num" }, pct(freq, 3)),
        el("td", { class: "num" }, num(max)), el("td", {}, label)));
    }
    shown = Math.min(rows.length, shown + 200);
    more.style.display = shown < rows.length ? "" : "none";
  }
  showMore();
  const match = new Set();
  fill(main, 
    el("nav", {}, el("a", { href: "index.html" }, "overview"),
      e > 0 ? expertLink(e - 1, "\u2190 expert " + (e - 1)) : null,
      e + 1 < o.num_experts ? expertLink(e + 1, "expert " + (e + 1) + " \u2192") : null),
    el("h1", {}, "Expert " + e),
    el("div", { class: "facts" }, fact("load", pct(info.load)), fact("width", info.width),
      fact("dead", pct(info.dead, 1)), fact("dense", pct(info.dense, 1)),
      fact("latents", "#" + e * o.latents_per_expert + "\u2013#" + ((e + 1) * o.latents_per_expert - 1))),
    el("h2", {}, o.kind === "synthetic" ? "Groups routed here most often" : "Tokens routed here most often"),
    keyChips(info.keys),
    el("h2", {}, "Tokens with the highest router probability for this expert"),
    el("div", { id: "routed" }, info.contexts.map((c) => contextRow(c, 0, vocab, match))),
    el("h2", {}, "Latents (by firing frequency)"),
    table(["latent", "frequency", "max act", o.kind === "synthetic" ? "best planted feature" : "top tokens"], [], "latents"),
    more);
  main.querySelector("table.latents").replaceChild(body, main.querySelector("table.latents tbody"));
}

async function renderLatent(main) {
  const o = await SAE.load("overview");
  const id = parseInt(location.hash.slice(1) || "0", 10);
  if (!(id >= 0 && id < o.num_latents)) {
    fill(main, el("p", {}, "no latent " + location.hash.slice(1) + " (0\u2013" + (o.num_latents - 1) + ")"),
      el("a", { href: "index.html" }, "overview"));
    return;
  }
  const block = Math.floor(id / o.block);
  const [data, vocab] = await Promise.all([SAE.load("block_" + block), o.kind === "text" ? SAE.load("vocab") : {}]);
  const r = data[String(id)];
  document.title = "latent " + id + " \u2014 SAE browser";
  const match = new Set((r.features || []).filter(([, c]) => c > 0.5).map(([f]) => f));
  const words = (list) => el("div", { class: "keys" }, list.map(([t, v]) => el("span", { title: "logit " + v }, showText(vocab[t] ?? "#" + t) + " " + v.toFixed(2))));
  fill(main, 
    el("nav", {}, el("a", { href: "index.html" }, "overview"), expertLink(r.expert),
      id > 0 ? latentLink(id - 1, "\u2190 #" + (id - 1)) : null,
      id + 1 < o.num_latents ? latentLink(id + 1, "#" + (id + 1) + " \u2192") : null),
    el("h1", {}, "Latent " + id),
    el("div", { class: "facts" }, fact("expert", r.expert), fact("local id", id % o.latents_per_expert),
      fact("fires on", pct(r.freq, 3) + " of tokens (" + r.count + ")"), fact("max activation", num(r.max))),
    o.note ? el("p", { class: "note" }, o.note) : null,
    el("div", { class: "cols" },
      el("div", {}, el("h2", {}, "Activation histogram"), histogram(r.hist, o.hist_edges)),
      r.features ? el("div", {}, el("h2", {}, "Planted features it matches (decoder cosine)"),
        table(["feature", "cosine"], r.features.map(([f, c]) => el("tr", {}, el("td", {}, "f" + f), el("td", { class: "num" }, c.toFixed(3)))))) : null,
      r.promoted ? el("div", { id: "effects" }, el("h2", {}, "Tokens its decoder row promotes"), words(r.promoted),
        el("h2", {}, "and suppresses"), words(r.suppressed)) : null),
    r.duplicates.length ? el("p", {}, "Duplicates in other experts: ",
      r.duplicates.map(([b, c]) => [latentLink(b), " (cos " + c.toFixed(3) + ") "])) : null,
    el("h2", {}, "Top activations"),
    el("div", { id: "top" }, r.top.length ? r.top.map((c) => contextRow(c, r.max, vocab, match)) : el("p", {}, "never fired")),
    el("h2", {}, "A random sample of weaker activations"),
    el("div", { id: "sample" }, r.sample.length ? r.sample.map((c) => contextRow(c, r.max, vocab, match))
      : el("p", {}, "none beyond the top activations")),
  );
}

const PAGES = { index: renderIndex, expert: renderExpert, latent: renderLatent };

function render() {
  const main = document.getElementById("main");
  PAGES[document.body.dataset.page](main).then(
    () => document.body.setAttribute("data-ready", location.hash || "yes"),
    (err) => {
      fill(main, el("p", { class: "note" }, String(err)));
      throw err;
    });
}

window.addEventListener("DOMContentLoaded", render);
window.addEventListener("hashchange", render);
