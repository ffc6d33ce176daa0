// lora-tune ui: plain JavaScript, no build step. Views by URL hash: #/ runs, #/run/NAME, #/compare/A,B,
// #/playground. Data from /ui/api (run folders) and /v1/chat/completions (serve's endpoint, streamed).
"use strict";

const view = document.getElementById("view");
const COLORS = ["#2563c9", "#d9480f", "#2f7d4f", "#8e44ad", "#a86b00", "#0b7285", "#c2255c"];
let stopPolling = () => {};
let routes = 0;  // route() calls so far: a view whose data arrives after a later route() (a click) draws nothing

// ---- the API, with the server's key when it asks for one
function headers() {
  const key = sessionStorage.getItem("lora-tune-key");
  return key ? {Authorization: `Bearer ${key}`} : {};
}

async function api(path) {
  const response = await fetch(path, {headers: headers()});
  if (response.status === 401) {
    document.getElementById("key").hidden = false;
    throw new Error("this server needs its API key (above)");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

document.getElementById("key").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("lora-tune-key", event.target.key.value);
  event.target.hidden = true;
  route();
});

// ---- small DOM helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

function number(value, digits = 4) {
  return value == null ? "" : Number(value).toFixed(digits);
}

function share(value) {
  return value == null ? "" : `${(100 * value).toFixed(1)}%`;
}

function shortPath(path) {  // a base's last two path parts (a hub id stays whole); the full path on hover
  return path.split("/").slice(-2).join("/");
}

function showError(error) {
  view.replaceChildren(el("p", {class: "error", text: String(error.message || error)}));
}

// ---- charts: one SVG per metric, a polyline and a dot per logged value for each series
function chart(title, series, key) {
  const width = 440, height = 220, pad = {left: 56, right: 12, top: 10, bottom: 28};
  const points = series.flatMap((s) => s.points);
  const box = el("div", {class: "chart", "data-chart": key});
  box.append(el("div", {class: "title", text: title}));
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("data-points", points.length);
  box.append(svg);
  if (!points.length) {
    box.append(el("div", {class: "muted", text: "nothing logged yet"}));
    return box;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs) || 1], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad.left + (x - x0) / ((x1 - x0) || 1) * (width - pad.left - pad.right);
  const sy = (y) => height - pad.bottom - (y - y0) / ((y1 - y0) || 1) * (height - pad.top - pad.bottom);
  const add = (name, attrs, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    svg.append(node);
  };
  add("line", {x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, stroke: "#99a"});
  add("line", {x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, stroke: "#99a"});
  const label = (v) => Math.abs(v) >= 1000 ? v.toFixed(0) : Math.abs(v) < 0.01 ? v.toExponential(1) : v.toPrecision(3);
  add("text", {x: pad.left - 4, y: pad.top + 10, "text-anchor": "end", "font-size": 11}, label(y1));
  add("text", {x: pad.left - 4, y: height - pad.bottom, "text-anchor": "end", "font-size": 11}, label(y0));
  add("text", {x: pad.left, y: height - 8, "font-size": 11}, `step ${x0}`);
  add("text", {x: width - pad.right, y: height - 8, "text-anchor": "end", "font-size": 11}, `step ${x1}`);
  const legend = el("div", {class: "legend"});
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    add("polyline", {points: s.points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "), fill: "none", stroke: color,
                     "stroke-width": 1.8});
    for (const p of s.points) add("circle", {class: "pt", cx: sx(p[0]), cy: sy(p[1]), r: 2.6, fill: color,
                                             "data-series": s.name});
    legend.append(el("span", {}, el("i", {style: `background:${color}`}), s.name));
  });
  box.append(legend);
  return box;
}

function series(rows, key, name) {
  return {name, points: rows.filter((row) => row[key] != null).map((row) => [row.step, row[key]])};
}

function runCharts(rows) {
  return el("div", {class: "charts"},
    chart("loss", [series(rows, "loss", "train"), series(rows, "eval_loss", "validation")], "loss"),
    chart("learning rate", [series(rows, "learning_rate", "learning rate")], "learning_rate"),
    chart("tokens/s", [series(rows, "train_tokens_per_second", "tokens/s")], "tokens_per_s"));
}

// ---- runs
const COLUMNS = [
  ["name", "run"], ["state", "state"], ["method", "method"], ["base", "base"], ["steps", "steps"],
  ["tokens_per_s", "tokens/s"], ["train_loss", "train loss"], ["validation_loss", "validation loss"],
  ["eval_loss", "held-out eval loss"], ["preference_accuracy", "pref. accuracy"],
];
let sortKey = "name", sortUp = true;

function flat(run) {
  return {...run, eval_loss: run.eval && run.eval.loss, preference_accuracy: run.eval && run.eval.preference_accuracy};
}

async function runsView() {
  const listing = await api("/ui/api/runs");
  document.getElementById("root").textContent = listing.root;
  const runs = listing.runs.map(flat);
  const table = el("table", {id: "runs"});
  const draw = () => {
    runs.sort((a, b) => {
      const [x, y] = [a[sortKey], b[sortKey]];
      const order = x == null ? 1 : y == null ? -1 : x < y ? -1 : x > y ? 1 : 0;
      return sortUp ? order : -order;
    });
    const head = el("tr", {}, el("th", {}, ""), ...COLUMNS.map(([key, label]) => el("th", {
      "data-key": key, class: ["name", "state", "method", "base"].includes(key) ? "text" : "",
      onclick: () => { sortUp = sortKey === key ? !sortUp : true; sortKey = key; draw(); },
      text: label + (sortKey === key ? (sortUp ? " ▲" : " ▼") : "")})));
    const body = runs.map((run) => el("tr", {"data-name": run.name},
      el("td", {}, el("input", {type: "checkbox", value: run.name})),
      el("td", {class: "text"}, el("a", {href: `#/run/${encodeURIComponent(run.name)}`, text: run.name})),
      el("td", {class: "text"}, el("span", {class: `state ${run.state}`, text: run.state, title: run.problem || ""}),
        run.problem ? el("div", {class: "problem", text: run.problem}) : null),
      el("td", {class: "text", text: run.method}),
      el("td", {class: "text", title: run.base, text: shortPath(run.base)}),
      el("td", {text: run.max_steps ? `${run.steps} / ${run.max_steps}` : run.steps}),
      el("td", {text: number(run.tokens_per_s, 0)}),
      el("td", {"data-key": "train_loss", text: number(run.train_loss)}),
      el("td", {"data-key": "validation_loss", text: number(run.validation_loss)}),
      el("td", {text: number(run.eval_loss)}),
      el("td", {text: share(run.preference_accuracy)})));
    table.replaceChildren(head, ...body);
  };
  draw();
  const compare = el("button", {text: "Compare selected", onclick: () => {
    const chosen = [...table.querySelectorAll("input:checked")].map((box) => box.value);
    if (chosen.length) location.hash = `#/compare/${chosen.map(encodeURIComponent).join(",")}`;
  }});
  return {nodes: [el("h2", {text: `Runs (${runs.length})`}), table, el("p", {}, compare),
    el("p", {class: "muted", text: "Click a column to sort; a run's name for its curves, recipe and evaluation."})]};
}

// ---- one run
function evalTable(report) {
  if (!report) return el("p", {class: "muted", text: "not evaluated yet: lora-tune eval RUN_FOLDER"});
  const pairs = report.pairs > 0;
  const head = el("tr", {}, ...["model", "loss", "perplexity", "gain kept"].concat(pairs ? ["pref. acc.", "margin"] : [])
    .map((label, i) => el("th", {class: i ? "" : "text", text: label})));
  const rows = report.models.map((m) => el("tr", {},
    el("td", {class: "text", text: m.name}), el("td", {text: number(m.loss)}), el("td", {text: number(m.perplexity, 2)}),
    el("td", {text: share(m.gain_kept)}),
    pairs ? el("td", {text: share(m.preference_accuracy)}) : null,
    pairs ? el("td", {text: number(m.reward_margin, 3)}) : null));
  return el("div", {},
    el("p", {class: "muted", text: `${report.rows} rows (${report.data})` + (pairs ? `; ${report.pairs} pairs` : "")}),
    el("table", {class: "eval"}, head, ...rows));
}

async function runView(name) {
  const run = await api(`/ui/api/runs/${encodeURIComponent(name)}`);
  let rows = (await api(`/ui/api/runs/${encodeURIComponent(name)}/metrics`)).rows;
  const charts = el("div", {}, runCharts(rows));
  const stateLabel = el("span", {class: `state ${run.state}`, text: run.state});
  const dropped = Object.entries(run.dropped);
  const nodes = [
    el("h2", {}, `${run.name} `, stateLabel),
    run.problem ? el("p", {class: "error", text: run.problem}) : null,
    el("p", {class: "muted", text: `${run.method} on ${run.base}; step ${run.steps}` +
                                   (run.max_steps ? ` of ${run.max_steps}` : "")}),
    charts,
    el("h3", {text: "Evaluation"}), evalTable(run.eval_report),
    run.eval_md ? el("details", {}, el("summary", {text: "eval.md (with generations)"}), el("pre", {text: run.eval_md}))
                : null,
    el("h3", {text: "Fast path"}),
    run.fast_path.length ? el("ul", {}, ...run.fast_path.map((line) => el("li", {text: line})))
                         : el("p", {class: "muted", text: "decided when the run finishes (run.json)"}),
    el("h3", {text: "Dropped rows"}),
    dropped.length ? el("ul", {}, ...dropped.map(([reason, numbers]) =>
      el("li", {text: `${reason}: ${numbers.length} (rows ${numbers.slice(0, 10).join(", ")}` +
                      `${numbers.length > 10 ? ", ..." : ""})`})))
                   : el("p", {class: "muted", text: run.data ? "none" : "known when the run finishes"}),
    el("h3", {text: "Recipe (resolved)"}), el("pre", {id: "recipe", text: run.recipe || ""})];
  return {nodes, live: run.state === "running" ? () => pollMetrics(name, rows, charts, stateLabel) : null};
}

function pollMetrics(name, rows, charts, stateLabel) {
  const timer = setInterval(async () => {  // a live run: new metrics.jsonl rows, no reload
    try {
      const update = await api(`/ui/api/runs/${encodeURIComponent(name)}/metrics?since=${rows.length}`);
      rows = update.count < rows.length ? (await api(`/ui/api/runs/${encodeURIComponent(name)}/metrics`)).rows
                                        : rows.concat(update.rows);
      if (update.rows.length) charts.replaceChildren(runCharts(rows));
      stateLabel.textContent = update.state;
      stateLabel.className = `state ${update.state}`;
      if (update.state !== "running") clearInterval(timer);
    } catch (error) {
      clearInterval(timer);
    }
  }, 1000);
  return () => clearInterval(timer);
}

// ---- compare
async function compareView(names) {
  const runs = await Promise.all(names.map((name) => api(`/ui/api/runs/${encodeURIComponent(name)}`)));
  const metrics = await Promise.all(names.map((name) => api(`/ui/api/runs/${encodeURIComponent(name)}/metrics`)));
  const train = names.map((name, i) => series(metrics[i].rows, "loss", `${name} train`));
  const validation = names.map((name, i) => series(metrics[i].rows, "eval_loss", `${name} validation`));
  return {nodes: [el("h2", {text: `Compare: ${names.join(", ")}`}),
    el("div", {class: "charts"}, chart("train loss", train, "compare_train"),
       chart("validation loss", validation, "compare_validation")),
    el("h3", {text: "Evaluation"}),
    el("div", {class: "columns"}, ...runs.map((run) => el("div", {"data-run": run.name},
      el("h3", {text: run.name}), evalTable(run.eval_report))))]};
}

// ---- playground: one prompt, answered by the base and each chosen adapter side by side, streamed
async function playgroundView() {
  const listing = await api("/ui/api/runs");
  const models = [listing.base, ...listing.served];
  const prompt = el("textarea", {id: "prompt", placeholder: "Ask something..."});
  const boxes = models.map((name, i) => el("label", {}, el("input", {type: "checkbox", value: name,
    ...(i < 3 ? {checked: ""} : {})}), ` ${name}`));
  const temperature = el("input", {id: "temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0});
  const maxTokens = el("input", {id: "max_tokens", type: "number", min: 1, max: 2048, value: 64});
  const answers = el("div", {class: "columns", id: "answers"});
  const ask = el("button", {id: "ask", text: "Ask", onclick: () => {
    const chosen = boxes.map((box) => box.querySelector("input")).filter((box) => box.checked).map((box) => box.value);
    answers.replaceChildren(...chosen.map((model) => {
      const text = el("div", {class: "answer"});
      const column = el("div", {"data-model": model}, el("h3", {text: model}), text);
      stream(model, prompt.value, Number(temperature.value), Number(maxTokens.value), text, column);
      return column;
    }));
  }});
  return {nodes: [el("h2", {text: "Playground"}),
    el("p", {class: "muted", text: "Each adapter is prompted with its own training template, as `lora-tune serve` " +
                                    "prompts it; the base like the first adapter."}),
    prompt, el("p", {class: "controls", id: "models"}, ...boxes),
    el("p", {class: "controls"}, el("label", {}, "temperature ", temperature),
       el("label", {}, "max tokens ", maxTokens), ask),
    answers]};
}

async function stream(model, text, temperature, maxTokens, out, column) {
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": "application/json", ...headers()},
      body: JSON.stringify({model, stream: true, temperature, max_tokens: maxTokens,
                            messages: [{role: "user", content: text}]})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        out.textContent += chunk.choices[0].delta.content || "";
      }
    }
  } catch (error) {
    out.append(el("div", {class: "error", text: String(error.message || error)}));
  }
  column.setAttribute("data-done", "1");
}

// ---- routing
async function route() {
  stopPolling();
  stopPolling = () => {};
  const mine = ++routes;
  const [, page, arg] = location.hash.match(/^#\/?([^/]*)\/?(.*)$/) || [null, "", ""];
  try {
    const shown = await (page === "run" ? runView(decodeURIComponent(arg))
      : page === "compare" ? compareView(arg.split(",").map(decodeURIComponent))
      : page === "playground" ? playgroundView() : runsView());
    if (mine !== routes) return;
    view.replaceChildren(...shown.nodes);
    if (shown.live) stopPolling = shown.live();
  } catch (error) {
    if (mine !== routes) return;
    showError(error);
  }
  document.body.setAttribute("data-view", page || "runs");
}

window.addEventListener("hashchange", route);
route();
