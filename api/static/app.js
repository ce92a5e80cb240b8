// The llmpress dashboard: one page, hash routes (#/jobs, #/jobs/<id>, #/submit), everything read from the /v1 API
// of this origin with the API key the user signed in with. No framework and no build step; the DOM is built with
// createElement and textContent only (never innerHTML), so nothing a job carries can become markup.
"use strict";

(() => {
  const KEY_STORAGE = "llmpress.apiKey";
  // Polling, not the SSE stream: EventSource cannot send the Authorization header.
  const POLL_MS = 1000;
  const PAGE_SIZE = 20;
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const STAGES = {
    fetching: "Fetching inputs", loading: "Loading", calibrating: "Calibrating", compressing: "Compressing",
    evaluating: "Evaluating", publishing: "Writing", uploading: "Uploading",
  };

  const TIME_FORMAT = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" };

  const $ = (selector, root = document) => root.querySelector(selector);

  // el("a", {href: "#/x", class: "c"}, "text", child): attributes and children; strings become text nodes.
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const SVG_NS = "http://www.w3.org/2000/svg";
  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    for (const child of children.flat()) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // ------------------------------------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, body) {
      const detail = body && body.detail;
      super(typeof detail === "string" ? detail : `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  const getKey = () => sessionStorage.getItem(KEY_STORAGE);

  async function api(path, { method = "GET", body, key } = {}) {
    const headers = { Authorization: `Bearer ${key || getKey()}`, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, cache: "no-store", credentials: "omit",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await response.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
    if (response.status === 401 && !key) {
      signOut("The key was not accepted; sign in again.");
    }
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  // ------------------------------------------------------------------------------------------------ formatting

  function fmtTime(iso) {
    if (!iso) return el("span", { class: "muted" }, "–");
    const date = new Date(iso);
    return el("time", { datetime: iso, title: date.toString() }, date.toLocaleString(undefined, TIME_FORMAT));
  }

  function fmtSeconds(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
    if (seconds < 1) return `${seconds.toFixed(2)} s`;
    if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
    const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
    if (m < 60) return `${m} min ${s} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0, v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i === 0 ? `${n} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
  }

  const fmtNum = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));
  const fmtPct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

  // Seconds the job has run (to its end when finished), from the server's timestamps.
  function duration(job) {
    if (!job.started_at) return null;
    const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
    return Math.max(0, (end - Date.parse(job.started_at)) / 1000);
  }

  // Remaining seconds, assuming the rest of the job goes as fast as what is done (fraction counts layers).
  function eta(job) {
    const p = job.progress || {};
    if (job.status !== "running" || !p.fraction || p.fraction >= 1) return null;
    const elapsed = duration(job);
    return elapsed === null ? null : (elapsed * (1 - p.fraction)) / p.fraction;
  }

  function progressText(job) {
    const p = job.progress || {};
    if (job.status === "succeeded") return "Done";
    if (job.status === "queued") return "Queued";
    const parts = [];
    if (TERMINAL.has(job.status)) parts.push(job.status === "cancelled" ? "Cancelled" : "Stopped");
    else parts.push(STAGES[p.stage] || p.stage || "Starting");
    if (p.layer && p.layers) parts.push(`layer ${p.layer} of ${p.layers}`);
    if (p.fraction !== null && p.fraction !== undefined) parts.push(`${Math.round(100 * p.fraction)}%`);
    const left = eta(job);
    if (left !== null) parts.push(`ETA ${fmtSeconds(left)}`);
    if (job.cancel_requested && !TERMINAL.has(job.status)) parts.push("cancel requested");
    return parts.join(" · ");
  }

  function setBar(bar, job) {
    const fraction = job.status === "succeeded" ? 1 : (job.progress && job.progress.fraction) || 0;
    const percent = Math.round(100 * Math.min(1, Math.max(0, fraction)));
    $(".bar-fill", bar).style.width = `${percent}%`;
    bar.setAttribute("aria-valuenow", String(percent));
    bar.setAttribute("aria-valuetext", progressText(job));
    bar.dataset.status = job.status;
  }

  function progressBar(job, label) {
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                            "aria-label": label }, el("div", { class: "bar-fill" }));
    setBar(bar, job);
    return bar;
  }

  const badge = (status) => el("span", { class: `badge status-${status}` }, status);

  // "SparseGPT 50% 2:4" from the recipe as submitted (YAML text or a list of modifier objects); the engine's
  // full description (report.recipe) is the cell's tooltip.
  function recipeSummary(job) {
    const recipe = job.request && job.request.recipe;
    const text = typeof recipe === "string" ? recipe : JSON.stringify(recipe || "");
    const names = [...new Set([...text.matchAll(/([A-Z][A-Za-z]*)Modifier\b/g)].map((m) => m[1]))];
    const sparsity = text.match(/"?sparsity"?\s*:\s*([0-9.]+)/);
    const mask = text.match(/"?mask_structure"?\s*:\s*["']?(\d+:\d+)/);
    const parts = [names.join(" + ") || "recipe"];
    if (sparsity) parts.push(`${Math.round(100 * Number(sparsity[1]))}%`);
    if (mask && mask[1] !== "0:0") parts.push(mask[1]);
    return parts.join(" ");
  }

  const labelChips = (labels) =>
    el("span", { class: "chips" }, Object.entries(labels || {}).map(([k, v]) => el("span", { class: "chip" }, `${k}=${v}`)));

  // ------------------------------------------------------------------------------------------------ routing

  // One poller at a time: a view starts its own and every route change stops the previous one.
  let pollToken = null, pollTimer = null;
  function stopPolling() {
    pollToken = null;
    if (pollTimer !== null) clearTimeout(pollTimer);
    pollTimer = null;
  }
  // Run fn now and then every POLL_MS until it returns false or another view starts polling.
  function poll(fn) {
    stopPolling();
    const token = {};
    pollToken = token;
    const tick = async () => {
      if (pollToken !== token) return;
      let again = true;
      try { again = await fn(); } catch (error) { if (!(error instanceof ApiError)) console.error(error); }
      if (again !== false && pollToken === token) pollTimer = setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function show(name) {
    for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
    for (const link of document.querySelectorAll("[data-nav]")) {
      if (link.dataset.nav === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    $("#nav").hidden = name === "signin";
  }

  function route() {
    stopPolling();
    if (!getKey()) {
      show("signin");
      $("#api-key").focus();
      return;
    }
    const hash = location.hash || "#/jobs";
    const match = hash.match(/^#\/jobs\/([A-Za-z0-9]{1,32})$/);
    if (match) return showJob(match[1]);
    if (hash === "#/submit") return showSubmit();
    if (hash !== "#/jobs") history.replaceState(null, "", "#/jobs");
    return showJobs();
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    stopPolling();
    jobsState.cursors = [null];
    $("#api-key-error").textContent = message || "";
    show("signin");
  }

  // ------------------------------------------------------------------------------------------------ sign-in

  $("#signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("#api-key").value.trim();
    const error = $("#api-key-error");
    error.textContent = "";
    if (!key) { error.textContent = "Enter an API key."; return; }
    try {
      await api("/v1/jobs?limit=1", { key });
    } catch (e) {
      error.textContent = e.status === 401 ? "This key was not accepted." : `Could not reach the API: ${e.message}`;
      $("#api-key").setAttribute("aria-invalid", "true");
      return;
    }
    $("#api-key").removeAttribute("aria-invalid");
    $("#api-key").value = "";
    sessionStorage.setItem(KEY_STORAGE, key);
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    route();
  });
  $("#sign-out").addEventListener("click", () => { signOut("Signed out."); });

  // ------------------------------------------------------------------------------------------------ jobs page

  const jobsState = { cursors: [null], page: 0, status: "", label: "" };

  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const label = $("#filter-label").value.trim();
    const error = $("#filter-label-error");
    if (label && !/^[^=,]+=[^,]*$/.test(label)) {
      error.textContent = "A label filter is key=value.";
      $("#filter-label").setAttribute("aria-invalid", "true");
      return;
    }
    error.textContent = "";
    $("#filter-label").removeAttribute("aria-invalid");
    Object.assign(jobsState, { status: $("#filter-status").value, label, cursors: [null], page: 0 });
    $("#jobs-body").replaceChildren();
    showJobs();
  });
  $("#filter-status").addEventListener("change", () => $("#filters").requestSubmit());
  $("#page-older").addEventListener("click", () => { jobsState.page += 1; $("#jobs-body").replaceChildren(); showJobs(); });
  $("#page-newer").addEventListener("click", () => {
    jobsState.page = Math.max(0, jobsState.page - 1);
    $("#jobs-body").replaceChildren();
    showJobs();
  });

  function jobRow(job) {
    const cell = (label, ...content) => el("td", { "data-label": label }, ...content);
    const p = job.progress || {};
    const where = p.layer && p.layers ? `${p.layer}/${p.layers}` : "";
    return el("tr", { "data-job": job.id, "data-status": job.status },
      cell("Status", badge(job.status)),
      cell("Job", el("a", { href: `#/jobs/${job.id}`, class: "mono" }, job.id)),
      cell("Model", el("span", { class: "wrap" }, job.request.model)),
      cell("Recipe", el("span", { title: job.report && job.report.recipe }, recipeSummary(job))),
      cell("Labels", labelChips(job.labels)),
      cell("Submitted", fmtTime(job.created_at)),
      cell("Started", fmtTime(job.started_at)),
      cell("Finished", fmtTime(job.finished_at)),
      cell("Duration", fmtSeconds(duration(job))),
      cell("Progress", el("div", { class: "progress-cell" },
        progressBar(job, `Progress of job ${job.id}`),
        el("span", { class: "small" }, [where && `layer ${where}`, progressText(job)].filter(Boolean).join(" · ")))),
    );
  }

  async function loadJobsPage() {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (jobsState.status) params.append("status", jobsState.status);
    if (jobsState.label) params.append("label", jobsState.label);
    const cursor = jobsState.cursors[jobsState.page];
    if (cursor) params.set("cursor", cursor);
    let data;
    try {
      data = await api(`/v1/jobs?${params}`);
    } catch (e) {
      $("#jobs-status").textContent = `Could not load jobs: ${e.message}`;
      throw e;
    }
    jobsState.cursors[jobsState.page + 1] = data.next_cursor;
    const body = $("#jobs-body");
    // Replace only rows that changed, so a poll does not move the keyboard focus or the scroll position.
    const existing = new Map([...body.children].map((row) => [row.dataset.job, row]));
    const rows = data.items.map((job) => {
      const signature = JSON.stringify([job.status, job.progress, job.finished_at, job.started_at, job.labels,
                                        job.cancel_requested, job.status === "running" ? Date.now() : 0]);
      const old = existing.get(job.id);
      if (old && old.dataset.signature === signature) return old;
      const row = jobRow(job);
      row.dataset.signature = signature;
      return row;
    });
    body.replaceChildren(...rows);
    $("#jobs-empty").hidden = rows.length > 0;
    $("#page-newer").disabled = jobsState.page === 0;
    $("#page-older").disabled = !data.next_cursor;
    $("#page-number").textContent = `Page ${jobsState.page + 1}`;
    const active = data.items.filter((j) => !TERMINAL.has(j.status)).length;
    $("#jobs-status").textContent = `${data.items.length} job${data.items.length === 1 ? "" : "s"} shown` +
      (active ? `, ${active} in progress` : "");
  }

  function showJobs() {
    show("jobs");
    $("#filter-status").value = jobsState.status;
    $("#filter-label").value = jobsState.label;
    poll(async () => { await loadJobsPage(); return true; });
  }

  // ------------------------------------------------------------------------------------------------ job page

  let jobState = null;

  $("#job-cancel").addEventListener("click", async () => {
    if (!jobState) return;
    const button = $("#job-cancel");
    button.disabled = true;
    try {
      renderJob(await api(`/v1/jobs/${jobState.id}/cancel`, { method: "POST" }));
    } catch (e) {
      $("#job-progress-text").textContent = `Could not cancel: ${e.message}`;
      button.disabled = false;
    }
  });

  function facts(target, pairs) {
    target.replaceChildren(...pairs.filter(([, v]) => v !== undefined && v !== null && v !== "")
      .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  }

  // Per-layer figures from the job's metrics: loss is the sum over the layer's modules (what the solver
  // minimised), sparsity the layer's reached fraction of zeros.
  function layerSeries(job) {
    const metrics = job.metrics || {};
    const layers = metrics.layers || {};
    const modules = metrics.modules || {};
    const lossByLayer = {};
    for (const entry of Object.values(modules)) {
      if (entry.loss === null || entry.loss === undefined) continue;
      lossByLayer[entry.layer] = (lossByLayer[entry.layer] || 0) + entry.loss;
    }
    return Object.keys(layers).map(Number).sort((a, b) => a - b).map((index) => ({
      index, name: layers[index].name, sparsity: layers[index].sparsity,
      loss: lossByLayer[index] === undefined ? null : lossByLayer[index], seconds: layers[index].seconds,
    }));
  }

  // Bars: per-layer loss (left axis); points joined by a line: reached sparsity (right axis, 0 to 100%).
  function layerChart(series, totalLayers) {
    const n = Math.max(series.length, totalLayers || 0, 1);
    const W = 640, H = 260, left = 56, right = 48, top = 16, bottom = 40;
    const plotW = W - left - right, plotH = H - top - bottom;
    const maxLoss = Math.max(...series.map((s) => s.loss || 0), 0) || 1;
    const slot = plotW / n;
    const x = (i) => left + slot * (i + 0.5);
    const yLoss = (v) => top + plotH * (1 - v / maxLoss);
    const ySparsity = (v) => top + plotH * (1 - v);
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "layer-chart", role: "img",
                               "aria-labelledby": "chart-svg-title chart-svg-desc", preserveAspectRatio: "xMidYMid meet" });
    chart.append(svg("title", { id: "chart-svg-title" }, "Per-layer loss and sparsity"));
    chart.append(svg("desc", { id: "chart-svg-desc" }, series.map((s) =>
      `layer ${s.index}: loss ${fmtNum(s.loss)}, sparsity ${fmtPct(s.sparsity)}`).join("; ")));
    const axes = svg("g", { class: "axes" });
    axes.append(svg("line", { x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }));
    axes.append(svg("line", { x1: left, y1: top, x2: left, y2: top + plotH }));
    axes.append(svg("line", { x1: left + plotW, y1: top, x2: left + plotW, y2: top + plotH }));
    for (const t of [0, 0.5, 1]) {
      axes.append(svg("text", { x: left - 6, y: yLoss(t * maxLoss) + 4, "text-anchor": "end" }, fmtNum(t * maxLoss, 2)));
      axes.append(svg("text", { x: left + plotW + 6, y: ySparsity(t) + 4, "text-anchor": "start" }, `${100 * t}%`));
    }
    for (let i = 0; i < n; i++) {
      axes.append(svg("text", { x: x(i), y: top + plotH + 16, "text-anchor": "middle" }, String(i)));
    }
    axes.append(svg("text", { x: left + plotW / 2, y: H - 4, "text-anchor": "middle" }, "layer"));
    chart.append(axes);
    const bars = svg("g", { class: "loss-bars" });
    for (const s of series) {
      if (s.loss === null) continue;
      const y = yLoss(s.loss);
      bars.append(svg("rect", { class: "loss-bar", "data-layer": s.index, x: x(s.index) - slot * 0.3, y,
                                width: slot * 0.6, height: Math.max(0.5, top + plotH - y) },
        svg("title", {}, `layer ${s.index} loss ${fmtNum(s.loss)}`)));
    }
    chart.append(bars);
    const points = series.filter((s) => s.sparsity !== null && s.sparsity !== undefined);
    if (points.length > 1) {
      chart.append(svg("polyline", { class: "sparsity-line",
                                     points: points.map((s) => `${x(s.index)},${ySparsity(s.sparsity)}`).join(" ") }));
    }
    const dots = svg("g", { class: "sparsity-points" });
    for (const s of points) {
      dots.append(svg("circle", { class: "sparsity-point", "data-layer": s.index, cx: x(s.index),
                                  cy: ySparsity(s.sparsity), r: 4 },
        svg("title", {}, `layer ${s.index} sparsity ${fmtPct(s.sparsity)}`)));
    }
    chart.append(dots);
    const legend = el("p", { class: "legend" },
      el("span", { class: "key key-loss" }), " loss (sum over the layer's modules, left axis) ",
      el("span", { class: "key key-sparsity" }), " sparsity reached (right axis)");
    return el("div", {}, chart, legend);
  }

  function renderQuality(job) {
    const report = job.report || {};
    const box = $("#job-quality");
    const ppl = report.perplexity || {};
    const rows = Object.entries(ppl).map(([name, p]) =>
      el("tr", {}, el("th", { scope: "row" }, name), el("td", {}, fmtNum(p.before)), el("td", {}, fmtNum(p.after)),
         el("td", {}, p.ratio === null || p.ratio === undefined ? "–" : Number(p.ratio).toFixed(4)),
         el("td", { class: "wrap" }, p.source || "")));
    const content = [];
    if (rows.length) {
      content.push(el("div", { class: "table-wrap" }, el("table", { class: "ppl" },
        el("thead", {}, el("tr", {}, ["Text", "Before", "After", "Ratio", "Source"].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows))));
    }
    const gate = report.quality_gate;
    if (gate) {
      content.push(el("p", { class: `gate ${gate.passed ? "pass" : "fail"}`, id: "job-gate" },
        gate.passed ? "Quality gate passed" : "Quality gate failed",
        ` (max perplexity ratio ${gate.max_ppl_ratio})`));
    } else if (job.request.eval) {
      content.push(el("p", { class: "muted" }, `Gate: max perplexity ratio ${job.request.eval.max_ppl_ratio}; not evaluated yet.`));
    }
    const totals = report.totals;
    if (totals) {
      content.push(el("p", {}, `Sparsity ${fmtPct(totals.sparsity)} of ${totals.params_targeted} targeted weights; ` +
        `total loss ${fmtNum(totals.loss)}; ${fmtSeconds(totals.seconds)} compressing.`));
    }
    if (content.length) box.replaceChildren(...content);
  }

  // The job's Ray workers (progress.workers: rank, node_id, node_ip, cpus, gpus), while it runs and after.
  function renderWorkers(job) {
    const workers = ((job.progress || {}).workers || []).slice().sort((a, b) => a.rank - b.rank);
    $("#job-workers-card").hidden = workers.length === 0;
    const num = (x) => (x === null || x === undefined ? "–" : String(x));
    const signature = JSON.stringify(workers);
    const body = $("#workers-body");
    if (body.dataset.signature === signature) return;  // unchanged: keep the rows (and any text selection)
    body.dataset.signature = signature;
    body.replaceChildren(...workers.map((w) =>
      el("tr", { "data-rank": w.rank },
        el("td", { "data-label": "Rank" }, num(w.rank)),
        el("td", { "data-label": "Node", class: "mono wrap" }, w.node_id || "–"),
        el("td", { "data-label": "Address", class: "mono" }, w.node_ip || "–"),
        el("td", { "data-label": "CPUs" }, num(w.cpus)),
        el("td", { "data-label": "GPUs" }, num(w.gpus)))));
  }

  // "2 workers × 4 CPUs each, 1 GPU each" from the request's resources (gpus left out: the cluster decides).
  function resourcesText(resources) {
    if (!resources) return null;
    const workers = resources.workers || 1, cpus = resources.cpus_per_worker || 1;
    const gpus = resources.gpus_per_worker;
    const parts = [`${workers} worker${workers === 1 ? "" : "s"}`, `${cpus} CPU${cpus === 1 ? "" : "s"} each`];
    parts.push(gpus === null || gpus === undefined ? "a GPU each if the cluster has one" : `${gpus} GPU${gpus === 1 ? "" : "s"} each`);
    return parts.join(", ");
  }

  function renderModules(job) {
    const modules = Object.entries((job.metrics || {}).modules || {})
      .sort(([a, x], [b, y]) => (x.layer - y.layer) || a.localeCompare(b));
    $("#modules-body").replaceChildren(...modules.map(([name, m]) =>
      el("tr", {},
        el("td", { "data-label": "Module", class: "mono nowrap" }, name),
        el("td", { "data-label": "Layer" }, m.layer),
        el("td", { "data-label": "Sparsity" }, fmtPct(m.sparsity)),
        el("td", { "data-label": "Loss" }, fmtNum(m.loss)),
        el("td", { "data-label": "Seconds" }, m.seconds === undefined ? "–" : Number(m.seconds).toFixed(3)),
        el("td", { "data-label": "Samples" }, m.samples === undefined ? "–" : m.samples))));
  }

  function eventSummary(event) {
    const d = event.data || {};
    if (event.type === "progress" && d.progress) {
      const p = d.progress;
      return [STAGES[p.stage] || p.stage, p.layer && p.layers ? `layer ${p.layer}/${p.layers}` : "",
              p.fraction !== undefined ? `${Math.round(100 * p.fraction)}%` : ""].filter(Boolean).join(" ");
    }
    if (event.type === "status") return [d.status, d.error].filter(Boolean).join(": ");
    return Object.entries(d).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  }

  async function loadEvents() {
    for (;;) {
      const events = await api(`/v1/jobs/${jobState.id}/events?after=${jobState.lastEvent}&limit=1000`);
      const list = $("#job-events");
      for (const event of events) {
        jobState.lastEvent = event.id;
        list.append(el("li", { "data-type": event.type }, fmtTime(event.created_at), " ",
                       el("span", { class: `event-type type-${event.type}` }, event.type), " ", eventSummary(event)));
      }
      if (events.length < 1000) return;
    }
  }

  // Download with the key in the Authorization header (a plain link cannot carry it), then hand the bytes to the
  // browser as a file. Presigned S3 links are ordinary links and skip this.
  async function download(event) {
    const link = event.currentTarget;
    if (!link.dataset.auth) return;
    event.preventDefault();
    link.setAttribute("aria-busy", "true");
    try {
      const response = await fetch(link.getAttribute("href"), {
        headers: { Authorization: `Bearer ${getKey()}` }, cache: "no-store", credentials: "omit",
      });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const url = URL.createObjectURL(await response.blob());
      const save = el("a", { href: url, download: link.getAttribute("download") || "" });
      document.body.append(save);
      save.click();
      save.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      link.after(el("span", { class: "error" }, ` download failed: ${e.message}`));
    } finally {
      link.removeAttribute("aria-busy");
    }
  }

  async function loadArtifacts(job) {
    const box = $("#job-artifacts");
    if (job.status !== "succeeded") {
      if (TERMINAL.has(job.status)) box.replaceChildren(el("p", { class: "muted" }, "Nothing was published."));
      return true;
    }
    let data;
    try {
      data = await api(`/v1/jobs/${job.id}/artifacts`);
    } catch (e) {
      box.replaceChildren(el("p", { class: "error" }, `Could not list the artifacts: ${e.message}`));
      return false;
    }
    const href = (key) => `/v1/jobs/${encodeURIComponent(job.id)}/artifacts/${key.split("/").map(encodeURIComponent).join("/")}`;
    const rows = data.files.map((f) => {
      const link = el("a", { href: f.url || href(f.key), download: f.key.split("/").pop(), class: "download",
                             "data-auth": f.url ? null : "1", "data-key": f.key, "data-sha256": f.sha256 },
                      "Download", el("span", { class: "sr-only" }, ` ${f.key}`));
      link.addEventListener("click", download);
      return el("tr", { "data-key": f.key },
        el("td", { "data-label": "File", class: "mono wrap" }, f.key),
        el("td", { "data-label": "Size" }, fmtBytes(f.size)),
        el("td", { "data-label": "sha256", class: "mono hash" }, el("code", { title: f.sha256 }, f.sha256)),
        el("td", { "data-label": "" }, link));
    });
    box.replaceChildren(
      el("p", {}, `${data.files.length} files, ${fmtBytes(data.total_size)} in all, at `, el("code", { class: "wrap" }, data.uri)),
      el("div", { class: "table-wrap" }, el("table", { class: "artifacts responsive", id: "artifacts-table" },
        el("thead", {}, el("tr", {}, ["File", "Size", "sha256", ""].map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows))));
    return true;
  }

  function renderJob(job) {
    jobState.job = job;
    const status = $("#job-status");
    status.className = `badge status-${job.status}`;
    status.textContent = job.status;
    $("#job-title").textContent = `Job ${job.id}`;
    const cancel = $("#job-cancel");
    cancel.hidden = TERMINAL.has(job.status) || job.cancel_requested;
    cancel.disabled = false;
    setBar($("#job-bar"), job);
    const text = progressText(job);
    if ($("#job-progress-text").textContent !== text) $("#job-progress-text").textContent = text;
    const p = job.progress || {};
    const waiting = job.status === "queued" && p.waiting ? `Waiting: ${p.waiting}` : "";
    $("#job-waiting").hidden = !waiting;
    if ($("#job-waiting").textContent !== waiting) $("#job-waiting").textContent = waiting;
    const resumed = p.resumed && p.resumed.layer && p.resumed.layers
      ? `This attempt resumed at layer ${p.resumed.layer} of ${p.resumed.layers}: the layers before it came from its checkpoint.`
      : "";
    $("#job-resumed").hidden = !resumed;
    if ($("#job-resumed").textContent !== resumed) $("#job-resumed").textContent = resumed;
    renderWorkers(job);
    facts($("#job-facts"), [
      ["Owner", job.owner], ["Labels", Object.keys(job.labels || {}).length ? labelChips(job.labels) : null],
      ["Submitted", fmtTime(job.created_at)], ["Started", fmtTime(job.started_at)],
      ["Finished", fmtTime(job.finished_at)], ["Duration", fmtSeconds(duration(job))],
      ["Attempt", job.attempt > 1 ? String(job.attempt) : null],
    ]);
    $("#job-error-card").hidden = !job.error;
    $("#job-error").textContent = job.error || "";
    const series = layerSeries(job);
    if (series.length) $("#job-chart").replaceChildren(layerChart(series, job.progress && job.progress.layers));
    renderModules(job);
    renderQuality(job);
    const request = job.request;
    facts($("#job-request"), [
      ["Model", request.model], ["Output", request.output],
      ["Dataset", request.dataset ? `${request.dataset.source} (${request.dataset.num_samples} × ${request.dataset.seq_len} tokens, seed ${request.dataset.seed})` : null],
      ["Quality gate", request.eval ? `${request.eval.source}, max ratio ${request.eval.max_ppl_ratio}` : null],
      ["Webhook", request.webhook ? request.webhook.url : null],
      ["Resources", resourcesText(request.resources)],
    ]);
    const recipe = typeof request.recipe === "string" ? request.recipe : JSON.stringify(request.recipe, null, 2);
    if ($("#job-recipe").textContent !== recipe) $("#job-recipe").textContent = recipe;
  }

  function showJob(id) {
    show("job");
    jobState = { id, lastEvent: 0, artifactsDone: false };
    $("#job-title").textContent = `Job ${id}`;
    $("#job-missing").hidden = true;
    $("#job-body").hidden = false;
    $("#job-status").textContent = "";
    $("#job-events").replaceChildren();
    $("#job-chart").replaceChildren(el("p", { class: "muted" }, "No layer finished yet."));
    $("#job-quality").replaceChildren(el("p", { class: "muted" }, "Perplexity appears when the job has been evaluated."));
    $("#job-artifacts").replaceChildren(el("p", { class: "muted" }, "Published when the job succeeds."));
    $("#job-cancel").hidden = true;
    $("#job-waiting").hidden = true;
    $("#job-resumed").hidden = true;
    $("#job-workers-card").hidden = true;
    $("#workers-body").replaceChildren();
    delete $("#workers-body").dataset.signature;
    const state = jobState;
    poll(async () => {
      if (jobState !== state) return false;
      let job;
      try {
        job = await api(`/v1/jobs/${id}`);
      } catch (e) {
        if (e.status === 404) {
          $("#job-missing").textContent = `Job ${id} not found (or it belongs to another key).`;
          $("#job-missing").hidden = false;
          $("#job-body").hidden = true;
          return false;
        }
        throw e;
      }
      if (jobState !== state) return false;
      renderJob(job);
      await loadEvents();
      if (TERMINAL.has(job.status)) {
        if (!state.artifactsDone) state.artifactsDone = await loadArtifacts(job);
        return !state.artifactsDone;
      }
      return true;
    });
  }

  // ------------------------------------------------------------------------------------------------ submit

  let examplesLoaded = false;
  async function loadExamples() {
    if (examplesLoaded) return;
    const response = await fetch("/ui/recipes", { cache: "no-store", credentials: "omit" });
    if (!response.ok) return;
    const select = $("#f-example");
    for (const recipe of await response.json()) {
      select.append(el("option", { value: recipe.text }, recipe.name));
    }
    examplesLoaded = true;
  }
  $("#f-example").addEventListener("change", (event) => {
    if (event.target.value) $("#f-recipe").value = event.target.value;
  });
  $("#f-gate").addEventListener("change", (event) => { $("#gate-fields").hidden = !event.target.checked; });

  // Where an API error about a field is shown: its loc (["body", "dataset", "num_samples"]) -> an error element.
  const FIELD_ERRORS = {
    "model": "f-model", "recipe": "f-recipe", "dataset": "f-dataset-all", "dataset.source": "f-dataset",
    "dataset.num_samples": "f-samples", "dataset.seq_len": "f-seqlen", "dataset.seed": "f-seed",
    "output": "f-output", "eval": "f-eval", "eval.source": "f-eval", "eval.max_ppl_ratio": "f-ratio",
    "eval.max_tokens": "f-maxtok", "labels": "f-labels",
  };

  function clearErrors() {
    for (const node of document.querySelectorAll("#submit-form .error")) node.textContent = "";
    for (const node of document.querySelectorAll("#submit-form [aria-invalid]")) node.removeAttribute("aria-invalid");
  }

  function showFieldError(loc, message) {
    const path = (loc || []).filter((part) => part !== "body" && typeof part === "string");
    // The longest known prefix of the location: ["recipe", 0, "X"] is the recipe field.
    for (let n = path.length; n > 0; n--) {
      const id = FIELD_ERRORS[path.slice(0, n).join(".")];
      if (id) {
        const target = $(`#${id}-error`);
        target.textContent = target.textContent ? `${target.textContent} ${message}` : message;
        const input = document.getElementById(id);
        if (input) input.setAttribute("aria-invalid", "true");
        return input;
      }
    }
    const general = $("#form-error");
    general.textContent = [general.textContent, message].filter(Boolean).join(" ");
    return null;
  }

  function numberOrText(value) {
    const n = Number(value);
    return value.trim() !== "" && Number.isFinite(n) ? n : value;
  }

  function formBody() {
    const body = { model: $("#f-model").value.trim(), recipe: $("#f-recipe").value, output: $("#f-output").value.trim() };
    const source = $("#f-dataset").value.trim();
    if (source) {
      body.dataset = { source };
      for (const [id, name] of [["f-samples", "num_samples"], ["f-seqlen", "seq_len"], ["f-seed", "seed"]]) {
        const value = $(`#${id}`).value;
        if (value.trim() !== "") body.dataset[name] = numberOrText(value);
      }
    }
    if ($("#f-gate").checked) {
      body.eval = { source: $("#f-eval").value.trim(), max_ppl_ratio: numberOrText($("#f-ratio").value) };
      const maxTokens = $("#f-maxtok").value;
      if (maxTokens.trim() !== "") body.eval.max_tokens = numberOrText(maxTokens);
    }
    const labels = $("#f-labels").value.trim();
    if (labels) {
      body.labels = {};
      for (const pair of labels.split(",").map((s) => s.trim()).filter(Boolean)) {
        const at = pair.indexOf("=");
        if (at <= 0) throw Object.assign(new Error(`label "${pair}" is not key=value`), { loc: ["labels"] });
        body.labels[pair.slice(0, at).trim()] = pair.slice(at + 1).trim();
      }
    }
    return body;
  }

  $("#submit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const button = $("#f-submit");
    let body;
    try {
      body = formBody();
    } catch (e) {
      showFieldError(e.loc, e.message);
      return;
    }
    const missing = [["model", body.model], ["recipe", body.recipe.trim()], ["output", body.output]]
      .filter(([, v]) => !v).map(([name]) => name);
    if (missing.length) {
      missing.forEach((name) => showFieldError([name], `${name} is required`));
      document.getElementById(FIELD_ERRORS[missing[0]]).focus();
      return;
    }
    button.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      if (e.status === 422 && Array.isArray(e.body && e.body.detail)) {
        let first = null;
        for (const error of e.body.detail) first = showFieldError(error.loc, error.msg) || first;
        if (first) first.focus();
      } else {
        $("#form-error").textContent = `The job was not submitted: ${e.message}`;
      }
    } finally {
      button.disabled = false;
    }
  });

  function showSubmit() {
    show("submit");
    loadExamples().catch(() => {});
  }

  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    // Poll only while the tab is visible; catch up at once when it comes back.
    if (document.hidden) stopPolling();
    else if (getKey()) route();
  });
  route();
})();
