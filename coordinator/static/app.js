// cogen dashboard: polls the JSON API every 2 s and redraws. Uses only /api/* (see /docs).
"use strict";

const REFRESH_MS = 2000;
const COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626", "#65a30d"];
const PLOT_CONFIG = { displayModeBar: false, responsive: true };

const $ = (id) => document.getElementById(id);
const esc = (value) => String(value ?? "").replace(/[&<>"']/g, (c) => (
  { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function fmtNumber(x, digits = 2) {
  return x === null || x === undefined ? "–" : Number(x).toFixed(digits);
}
function fmtBytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtAgo(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${(seconds / 3600).toFixed(1)} h ago`;
}
function fmtTime(unix) {
  return unix ? new Date(unix * 1000).toLocaleTimeString() : "–";
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function renderSummary(swarm, alerts) {
  $("swarm-name").textContent = swarm.swarm;
  document.title = `cogen · ${swarm.swarm}`;
  $("peers-online").textContent = `${swarm.peers_online} / ${swarm.peers.length}`;
  $("samples-per-second").textContent = fmtNumber(swarm.samples_per_second, 1);
  $("generation").textContent = swarm.generation ?? "–";
  $("last-merge").textContent = swarm.last_merge_at ? fmtTime(swarm.last_merge_at) : "none yet";
  $("alert-count").textContent = alerts.alerts.length;
  $("alert-count").classList.toggle("bad", alerts.alerts.length > 0);
}

function renderAlerts(alerts) {
  const list = $("alerts");
  if (!alerts.alerts.length) {
    list.innerHTML = '<li class="empty">no alerts</li>';
    return;
  }
  list.innerHTML = alerts.alerts.map((a) => `<li class="${esc(a.severity)}" data-kind="${esc(a.kind)}" `
    + `data-subject="${esc(a.subject)}"><span class="kind">${esc(a.kind.replace("_", " "))}</span>`
    + `${esc(a.message)}</li>`).join("");
}

function renderPeers(peers) {
  const body = $("peers").tBodies[0];
  if (!peers.length) {
    body.innerHTML = '<tr class="empty"><td colspan="10">no peers yet</td></tr>';
    return;
  }
  body.innerHTML = peers.map((p) => `<tr data-peer="${esc(p.id)}" data-state="${esc(p.state)}" `
    + `class="${esc(p.state)}">`
    + `<td class="mono" title="${esc(p.peer_id)}">${esc(p.id.slice(0, 8))}</td>`
    + `<td class="expert">${esc(p.expert)}</td>`
    + `<td><span class="state ${esc(p.state)}">${esc(p.state)}</span></td>`
    + `<td title="${esc(p.device_name)}">${esc(p.device)} · ${esc(p.precision)}</td>`
    + `<td class="memory">${memoryText(p)}</td>`
    + `<td class="num">${p.step}</td>`
    + `<td class="num">${p.loss_is_nan ? "NaN" : fmtNumber(p.loss, 3)}</td>`
    + `<td class="num">${fmtNumber(p.samples_per_second, 1)}</td>`
    + `<td class="num">${fmtAgo(p.last_seen_s)}</td>`
    + `<td>${esc(p.software_version)} / p${esc(p.protocol_version)}</td></tr>`).join("");
}

function memoryText(p) {
  // the node's own memory (RSS, and CUDA memory on a GPU), then the machine's total
  const own = p.rss_bytes === null || p.rss_bytes === undefined ? "–" : fmtBytes(p.rss_bytes);
  const gpu = p.gpu_memory_bytes === null || p.gpu_memory_bytes === undefined
    ? "" : ` · GPU ${fmtBytes(p.gpu_memory_bytes)}`;
  return `<span class="own">${own}${gpu}</span> <span class="total">of ${fmtBytes(p.memory_bytes)}</span>`;
}

function roundText(round) {
  if (!round) return "no averaging rounds yet";
  const result = round.ok ? "ok" : `failed${round.error ? `: ${round.error}` : ""}`;
  return `round ${round.outer_step}: ${round.group_size} peers, ${fmtNumber(round.duration_s, 1)} s, `
    + `${fmtBytes(round.bytes_sent)}, ${result}`;
}

function groupCard(expert) {
  let card = document.getElementById(`group-${expert}`);
  if (!card) {
    card = document.createElement("div");
    card.className = "group";
    card.id = `group-${expert}`;
    card.dataset.expert = expert;
    card.innerHTML = `<h3>${esc(expert)}</h3><div class="facts"></div><div class="chart"></div>`;
    $("groups").appendChild(card);
    // plotly follows window resizes only; a card also narrows when another card joins the grid
    const chart = card.querySelector(".chart");
    new ResizeObserver(() => {
      if (chart.classList.contains("js-plotly-plot")) Plotly.Plots.resize(chart);
    }).observe(chart);
  }
  return card;
}

function renderGroups(groups) {
  const container = $("groups");
  container.querySelector(".empty")?.remove();
  if (!groups.length && !container.children.length) {
    container.innerHTML = '<p class="empty">no expert groups yet</p>';
    return;
  }
  const wanted = new Set(groups.map((g) => `group-${g.expert}`));
  for (const card of [...container.querySelectorAll(".group")]) {
    if (!wanted.has(card.id)) { Plotly.purge(card.querySelector(".chart")); card.remove(); }
  }
  for (const g of groups) {
    const card = groupCard(g.expert);
    card.querySelector(".facts").innerHTML = `<span>members <b>${g.members}</b> / ${g.peers.length}</span>`
      + `<span>outer step <b>${g.outer_step ?? "–"}</b></span>`
      + `<span>samples/s <b>${fmtNumber(g.samples_per_second, 1)}</b></span>`
      + `<span>mean loss <b>${fmtNumber(g.mean_loss, 3)}</b></span>`
      + `<span class="round">${esc(roundText(g.last_round))}</span>`;
    const traces = g.loss.map((s, i) => ({
      x: s.t.map((t) => new Date(t * 1000)), y: s.loss, customdata: s.step,
      name: s.peer.slice(0, 8), type: "scatter", mode: "lines+markers",
      line: { width: 2, color: COLORS[i % COLORS.length] }, marker: { size: 4 },
      hovertemplate: "step %{customdata}<br>loss %{y:.4f}<extra>%{fullData.name}</extra>",
    }));
    const chart = card.querySelector(".chart");
    // redraw only when the curves changed: a chart mid-redraw every poll costs CPU and flickers
    const signature = g.loss.map((s) => `${s.peer}:${s.t.length}:${s.t[s.t.length - 1]}`).join(",");
    if (chart.dataset.signature === signature) continue;
    chart.dataset.signature = signature;
    chart.dataset.points = String(g.loss.reduce((n, s) => n + s.loss.filter((y) => y !== null).length, 0));
    Plotly.react(chart, traces, {
      margin: { l: 44, r: 8, t: 8, b: 32 }, showlegend: traces.length > 1,
      legend: { orientation: "h", y: -0.22, font: { size: 11 } },
      yaxis: { title: { text: "loss", font: { size: 11 } }, gridcolor: "#eef1f5", zeroline: false },
      xaxis: { gridcolor: "#eef1f5", tickformat: "%H:%M:%S" }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { family: "system-ui, sans-serif", size: 11, color: "#374151" },
    }, PLOT_CONFIG);
  }
}

function renderGenerations(generations) {
  const root = $("generations");
  if (!generations.length) {
    root.innerHTML = '<p class="empty">no generations yet</p>';
    return;
  }
  const latest = generations[generations.length - 1];
  const lineage = generations.map((g) => `<tr><td class="num">${g.generation}</td>`
    + `<td class="mono">${esc(g.base_hash.slice(0, 12))}</td><td class="mono">${esc((g.parent_hash || "–").slice(0, 12))}</td>`
    + `<td>${fmtTime(g.created_at)}</td><td>${esc(g.merge_method || "–")}</td>`
    + `<td class="mono">${esc(g.manifest_hash.slice(0, 12))}</td>`
    + `<td>${g.signature_ok === null ? "unchecked" : g.signature_ok ? "valid" : "INVALID"}</td></tr>`).join("");
  const domains = [...new Set(latest.scores.map((s) => s.domain))];
  const ranked = latest.ranking.length ? latest.ranking : [...new Set(latest.scores.map((s) => s.expert))];
  // the base the experts started from, the experts (ranked), the merged base, the routed mixture
  const has = (name) => latest.scores.some((s) => s.expert === name);
  const experts = [...(has("base") ? ["base"] : []), ...ranked.filter((e) => e !== "base"),
    ...["merged", "mixture"].filter(has)];
  const cell = (d, e) => latest.scores.find((s) => s.domain === d && s.expert === e);
  const change = (d, e) => {  // against the base: what training, merging or routing bought
    const base = cell(d, "base")?.loss, loss = cell(d, e)?.loss;
    if (e === "base" || base === null || base === undefined || loss === null || loss === undefined) return "";
    const pct = (100 * (loss - base)) / base;
    return ` <span class="delta ${pct <= 0 ? "better" : "worse"}">${pct > 0 ? "+" : ""}${pct.toFixed(1)} %</span>`;
  };
  const matrix = experts.map((e) => `<tr data-row="${esc(e)}"><td>${esc(e)}</td>`
    + domains.map((d) => `<td class="num">${fmtNumber(cell(d, e)?.loss, 3)}${change(d, e)}</td>`).join("")
    + "</tr>").join("");
  root.innerHTML = `<div class="table-wrap"><table><thead><tr><th class="num">Gen</th><th>Base</th>`
    + `<th>Parent</th><th>Created</th><th>Merge</th><th>Manifest</th><th>Signature</th></tr></thead>`
    + `<tbody>${lineage}</tbody></table></div>`
    + `<h2>Evaluation of generation ${latest.generation} (loss per domain and change against the base; `
    + `experts ranked; cheap-ranking `
    + `Kendall τ ${fmtNumber(latest.kendall_tau, 2)})</h2>`
    + `<div class="table-wrap"><table><thead><tr><th>Expert</th>`
    + domains.map((d) => `<th class="num">${esc(d)}</th>`).join("") + `</tr></thead><tbody>${matrix}</tbody></table></div>`
    + cheapLine(latest, generations)
    + '<div class="panel"><div id="ranking-chart" class="chart"></div></div>';
  Plotly.react("ranking-chart", domains.map((d, i) => ({
    type: "bar", name: d, x: experts, y: experts.map((e) => cell(d, e)?.loss ?? null),
    marker: { color: COLORS[i % COLORS.length] },
  })), { barmode: "group", margin: { l: 44, r: 8, t: 8, b: 32 }, yaxis: { title: { text: "loss" } } },
  PLOT_CONFIG);
}

// the cheap ranking (nodes' spot-checked prequential claims) and the latest audit's agreement with the full one
function cheapLine(latest, generations) {
  if (!latest.cheap_ranking || latest.cheap_ranking.length === 0) return "";
  const audit = [...generations].reverse().find((g) => g.audit && g.audit_top1 !== null && g.audit_top1 !== undefined);
  const flagged = Object.keys(latest.flagged || {});
  return `<p id="cheap-ranking">Cheap ranking (own-domain gain from prequential claims): `
    + `${latest.cheap_ranking.map(esc).join(", ")} · spot-checks ${latest.cheap_cost_tokens ?? 0} tokens`
    + (flagged.length ? ` · <span class="worse">claims refused: ${flagged.map(esc).join(", ")}</span>` : "")
    + (audit ? ` · audit of generation ${audit.generation}: Kendall τ ${fmtNumber(audit.audit_kendall_tau, 2)}, `
      + `top-1 ${audit.audit_top1 ? "agrees" : "differs"}, full evaluation ${audit.full_cost_tokens} tokens` : "")
    + "</p>";
}

// the publishing gate's newest decision: a refusal (the parent stayed the base) or the published
// generation's candidates; per candidate and domain, the paired change against the parent and its interval
function renderGate(gate) {
  const root = $("gate");
  const report = gate.refused || gate.published;
  if (!report) {
    root.innerHTML = '<p class="empty">no gate decision yet</p>';
    return;
  }
  const domains = [];
  for (const a of report.attempts) {
    for (const d of a.domains) if (!domains.some((x) => x.domain === d.domain)) domains.push(d);
  }
  const pct = (x, parent) => (x === null ? "–" : `${x > 0 ? "+" : ""}${((100 * x) / parent).toFixed(2)} %`);
  const cellOf = (a, name) => {
    const d = a.domains.find((x) => x.domain === name);
    if (!d) return '<td class="num">–</td>';
    const interval = d.interval ? ` [${pct(d.interval[0], d.parent_loss)}, ${pct(d.interval[1], d.parent_loss)}]` : "";
    return `<td class="num" data-domain="${esc(name)}" data-worse="${d.worse}">`
      + `<span class="delta ${d.worse ? "worse" : "better"}">${pct(d.change, d.parent_loss)}</span>`
      + `<span class="muted">${interval}</span></td>`;
  };
  const weights = (a) => Object.entries(a.weights).map(([e, w]) => `${esc(e)} ${fmtNumber(w, 2)}`).join(", ");
  const rows = report.attempts.map((a, i) => `<tr data-attempt="${i + 1}" data-passed="${a.passed}">`
    + `<td class="num">${i + 1}</td><td>${esc(a.why)}</td><td>${weights(a)}</td>`
    + `<td class="num">${fmtNumber(a.scale, 2)}</td>${domains.map((d) => cellOf(a, d.domain)).join("")}`
    + `<td class="${a.passed ? "better" : "worse"}">${a.passed ? "passed" : "worse than the parent"}</td></tr>`).join("");
  const verdict = report.passed
    ? `Generation ${report.generation} published: ${esc(report.reason)}`
    : `Generation ${report.generation} not published, the parent stays the base: ${esc(report.reason)}`;
  root.innerHTML = `<p id="gate-verdict" class="${report.passed ? "better" : "worse"}" `
    + `data-generation="${report.generation}" data-passed="${report.passed}">${verdict} `
    + `<span class="muted">(${report.blocks_per_domain} blocks per domain, ${Math.round(100 * report.level)} % `
    + `bootstrap intervals, ${fmtNumber(report.seconds, 1)} s)</span></p>`
    + `<div class="table-wrap"><table><thead><tr><th class="num">#</th><th>Candidate</th><th>Weights</th>`
    + `<th class="num">Scale</th>${domains.map((d) => `<th class="num">${esc(d.domain)}${d.general ? " (general)" : ""}</th>`).join("")}`
    + `<th>Verdict</th></tr></thead><tbody>${rows}</tbody></table></div>`;
}

async function refresh() {
  try {
    const [swarm, peers, groups, generations, alerts, gate] = await Promise.all(
      ["api/swarm", "api/peers", "api/groups", "api/generations", "api/alerts", "api/gate"].map(getJSON));
    renderSummary(swarm, alerts);
    renderAlerts(alerts);
    renderPeers(peers);
    renderGroups(groups);
    renderGenerations(generations);
    renderGate(gate);
    $("status").className = "status live";
    $("status").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    $("status").className = "status down";
    $("status").textContent = `API unreachable (${error.message}); retrying`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
