// dqid cluster dashboard: polls the node that served this page (relative
// URLs: cluster, held, messages/ID, kick/ID) and draws what it answers.
// Everything from the server goes into the page as text, never as HTML.
"use strict";

const POLL_MS = 1000;          // at most one poll a second
const HISTORY_SECONDS = 300;   // the sparklines' window
const HELD_SHOWN = 50;
const TOKEN_KEY = "dqid-token";
const RATE_COUNTERS = ["pushed", "delivered", "acked"];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  needToken: false,    // the last request was answered 401: wait for a token
  samples: [],         // [{t: seconds, nodes: {id: {epoch, counters}}}]
  timer: null,
  polling: false,
  lastPoll: 0,
};

const $ = (selector) => document.querySelector(selector);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function setStatus(text, isError) {
  const status = $("#status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

// -- talking to the node -------------------------------------------------

class Unauthorized extends Error {}

// fetch() with the bearer token when there is one; a 401 asks for a token
// and throws Unauthorized.
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.token) headers.set("Authorization", "Bearer " + state.token);
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401) {
    askForToken(state.token
      ? "401 Unauthorized: the node refused this token. Enter another one."
      : "401 Unauthorized: this node needs a bearer token (--http-token-file).");
    throw new Unauthorized();
  }
  return response;
}

async function apiJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(path + ": " + (await errorText(response)));
  return response.json();
}

// The API's error message ({"error", "message"}), or the status line.
async function errorText(response) {
  try {
    const body = await response.json();
    return body.message || body.error || response.status;
  } catch (_) {
    return response.status + " " + response.statusText;
  }
}

// -- the token -----------------------------------------------------------

function askForToken(message) {
  state.token = null;
  state.needToken = true;
  sessionStorage.removeItem(TOKEN_KEY);
  $("#auth-message").textContent = message;
  $("#auth").hidden = false;
  setStatus(message, true);
  for (const button of document.querySelectorAll("button.kick")) button.disabled = true;
  $("#token").focus();
}

function useToken(event) {
  event.preventDefault();
  const token = $("#token").value.trim();
  if (!token) return;
  state.token = token;
  state.needToken = false;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token").value = "";
  $("#auth").hidden = true;
  setStatus("token set; loading…");
  schedule();
}

// -- polling ---------------------------------------------------------------

// Plans the next poll: none while the tab is hidden or a token is needed,
// and never sooner than POLL_MS after the previous one started.
function schedule() {
  clearTimeout(state.timer);
  state.timer = null;
  if (document.hidden || state.needToken || state.polling) return;
  state.timer = setTimeout(poll, Math.max(0, state.lastPoll + POLL_MS - Date.now()));
}

async function poll() {
  state.timer = null;
  state.polling = true;
  state.lastPoll = Date.now();
  try {
    const cluster = await apiJson("cluster");
    renderCluster(cluster);
    renderHeld((await apiJson("held?count=" + HELD_SHOWN)).messages);
    setStatus("updated " + new Date().toLocaleTimeString());
    document.body.classList.remove("stale");
  } catch (error) {
    // What is shown is what the node said last, not now: dimmed.
    document.body.classList.add("stale");
    if (!(error instanceof Unauthorized)) setStatus("cannot read the cluster: " + error.message, true);
  } finally {
    state.polling = false;
    schedule();
  }
}

// -- nodes -------------------------------------------------------------------

function renderCluster(cluster) {
  const nodes = cluster.nodes || {};
  const ids = Object.keys(nodes).sort();
  if (cluster.node) $("#served-by").textContent = "served by " + cluster.node;
  $("#nodes tbody").replaceChildren(...ids.map((id) => nodeRow(id, nodes[id])));
  renderMatrix(ids, nodes);
  addSample(nodes);
  renderRates();
}

function nodeRow(id, entry) {
  const row = el("tr");
  row.dataset.node = id;
  const stats = entry.up ? entry.stats : null;
  row.className = stats ? (stats.ready_to_serve ? "ready" : "not-ready") : "down";
  row.append(el("td", id, "node"), stateCell(entry));
  if (!stats) {
    for (let i = 0; i < 7; i++) row.append(el("td", "—"));
    return row;
  }
  row.append(el("td", stats.epoch, "epoch"), depthCell(stats.depth, stats.size));
  for (const name of ["ready", "leased", "delayed", "held"]) row.append(el("td", stats[name], name));
  // /stats names it oldest_ready_age (seconds); nothing ready: no age.
  const oldest = stats.oldest_ready_age ?? stats.oldest_ready_age_seconds;
  row.append(el("td", stats.ready > 0 ? age(oldest) : "—", "oldest"));
  return row;
}

function stateCell(entry) {
  const cell = el("td", null, "state");
  if (!entry.up) {
    cell.append(el("span", "down", "badge down"), el("span", entry.error || "", "reason"));
  } else if (entry.stats.ready_to_serve) {
    cell.append(el("span", "ready", "badge ready"));
  } else {
    cell.append(el("span", "not ready", "badge not-ready"),
                el("span", entry.stats.not_ready_reason || "", "reason"));
  }
  return cell;
}

function depthCell(depth, size) {
  const cell = el("td", null, "depth");
  const bar = el("span", null, "bar");
  const fill = el("span");
  const share = size > 0 ? Math.min(1, depth / size) : 0;
  fill.style.width = (share * 100).toFixed(1) + "%";
  bar.classList.toggle("full", share >= 0.9);
  bar.append(fill);
  cell.append(bar, el("span", depth + " / " + size, "depth-text"));
  return cell;
}

function age(seconds) {
  if (typeof seconds !== "number") return "—";
  if (seconds < 60) return seconds.toFixed(1) + " s";
  if (seconds < 3600) return (seconds / 60).toFixed(1) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

// -- who holds whose messages ---------------------------------------------------

// Rows: the holder; columns: the owner.  A cell is holder.peers[owner].held;
// the diagonal is the owner's own depth.  A down owner's column is marked:
// its queue waits there on its peers.
function renderMatrix(ids, nodes) {
  const head = el("tr");
  head.append(el("th", "holder \\ owner"));
  for (const owner of ids) head.append(el("th", owner, nodes[owner].up ? "" : "down"));
  $("#matrix thead").replaceChildren(head);
  $("#matrix tbody").replaceChildren(...ids.map((holder) => {
    const row = el("tr");
    row.append(el("th", holder, nodes[holder].up ? "" : "down"));
    for (const owner of ids) row.append(matrixCell(holder, owner, nodes));
    return row;
  }));
  $("#waiting").textContent = ids.filter((id) => !nodes[id].up)
    .map((owner) => `${owner} is down: its queue waits on ${holdersOf(owner, ids, nodes)}.`)
    .join(" ");
}

// "a (7), c (7)": the live peers holding copies of a down owner's messages.
function holdersOf(owner, ids, nodes) {
  const holders = ids.filter((id) => nodes[id].up && nodes[id].stats.peers && nodes[id].stats.peers[owner])
    .map((id) => `${id} (${nodes[id].stats.peers[owner].held})`);
  return holders.length ? holders.join(", ") : "no live peer";
}

function matrixCell(holder, owner, nodes) {
  const stats = nodes[holder].up ? nodes[holder].stats : null;
  let value = "—";
  let className = "";
  if (holder === owner) {
    className = "self";
    if (stats) value = stats.depth;
  } else if (stats && stats.peers && stats.peers[owner]) {
    value = stats.peers[owner].held;
    if (!nodes[owner].up) className = "waiting";
  }
  const cell = el("td", value, className);
  cell.dataset.holder = holder;
  cell.dataset.owner = owner;
  return cell;
}

// -- rates -------------------------------------------------------------------------

function addSample(nodes) {
  const sample = { t: performance.now() / 1000, nodes: {} };
  for (const [id, entry] of Object.entries(nodes)) {
    if (entry.up) sample.nodes[id] = { epoch: entry.stats.epoch, counters: entry.stats.counters || {} };
  }
  state.samples.push(sample);
  while (state.samples.length && state.samples[0].t < sample.t - HISTORY_SECONDS) state.samples.shift();
}

// The cluster's rate of one counter between two samples: the sum of each
// node's increase.  A node that restarted (new epoch, or a counter that went
// down) counts from zero; a node missing from either sample is left out.
function rateBetween(before, after, counter) {
  let total = 0;
  for (const [id, now] of Object.entries(after.nodes)) {
    const then = before.nodes[id];
    if (!then) continue;
    const current = now.counters[counter] || 0;
    const previous = then.epoch === now.epoch ? then.counters[counter] || 0 : 0;
    total += current >= previous ? current - previous : current;
  }
  return total / Math.max(after.t - before.t, 0.001);
}

function renderRates() {
  const samples = state.samples;
  for (const counter of RATE_COUNTERS) {
    const series = [];
    for (let i = 1; i < samples.length; i++) series.push(rateBetween(samples[i - 1], samples[i], counter));
    const box = document.querySelector(`.rate[data-counter="${counter}"]`);
    drawSparkline(box.querySelector("svg"), series);
    box.querySelector(".value").textContent =
      series.length ? series[series.length - 1].toFixed(1) + " /s" : "—";
  }
}

// A line with the area under it, scaled to the series' peak (at least 1).
// The newest value is at the right edge; the x axis spans at least a minute
// and grows with the history up to HISTORY_SECONDS.
function drawSparkline(svg, series) {
  const width = 240, height = 32;
  const slots = Math.max(series.length, 60);
  const peak = Math.max(1, ...series);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const start = slots - series.length;
  const points = series.map((value, i) => {
    const x = ((start + i) / (slots - 1)) * width;
    const y = height - 2 - (value / peak) * (height - 4);
    return x.toFixed(1) + "," + y.toFixed(1);
  });
  const line = svgElement("polyline", { points: points.join(" ") });
  const area = svgElement("polygon", {
    points: points.length ? `${points[0].split(",")[0]},${height} ${points.join(" ")} ${width},${height}` : "",
  });
  const title = svgElement("title", {});
  title.textContent = "peak " + peak.toFixed(1) + " /s";
  svg.replaceChildren(title, area, line);
}

function svgElement(tag, attributes) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  return node;
}

// -- held messages ------------------------------------------------------------------

function renderHeld(messages) {
  $("#held-none").hidden = messages.length > 0;
  $("#held tbody").replaceChildren(...messages.map((message) => {
    const row = el("tr");
    row.dataset.id = message.id;
    const actions = el("td");
    const peekButton = el("button", "peek", "peek");
    peekButton.addEventListener("click", () => peek(message.id));
    const kickButton = el("button", "kick", "kick");
    kickButton.disabled = state.needToken;
    kickButton.addEventListener("click", () => kick(message.id, kickButton));
    actions.append(peekButton, " ", kickButton);
    row.append(el("td", message.id, "id"), el("td", message.deliveries),
               el("td", message.content_type, "type"), el("td", message.bytes), actions);
    return row;
  }));
}

async function peek(id) {
  const title = $("#peek-title"), body = $("#peek-body");
  $("#peek").hidden = false;
  title.textContent = "message " + id;
  body.textContent = "…";
  try {
    const response = await api("messages/" + encodeURIComponent(id));
    if (!response.ok) {
      body.textContent = await errorText(response);
      return;
    }
    title.textContent = `message ${id} · state ${response.headers.get("Dqid-State")} · ` +
      `deliveries ${response.headers.get("Dqid-Deliveries")} · ${response.headers.get("Content-Type")}`;
    body.textContent = bodyText(new Uint8Array(await response.arrayBuffer()));
  } catch (error) {
    body.textContent = error instanceof Unauthorized ? "a token is needed to peek" : error.message;
  }
}

// The body as text when it is UTF-8 without control characters (other than
// tab and line breaks); else "binary, N bytes".
function bodyText(bytes) {
  try {
    const text = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    if (!/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/.test(text)) return text;
  } catch (_) { /* not UTF-8 */ }
  return `binary, ${bytes.length} bytes`;
}

async function kick(id, button) {
  button.disabled = true;
  try {
    const response = await api("kick/" + encodeURIComponent(id), { method: "POST" });
    if (response.status === 204) {
      setStatus("kicked " + id);
      button.closest("tr").remove();
      $("#held-none").hidden = $("#held tbody").children.length > 0;
    } else {
      setStatus("kick " + id + ": " + (await errorText(response)), true);
      button.disabled = false;
    }
  } catch (error) {
    if (!(error instanceof Unauthorized)) {
      setStatus("kick " + id + ": " + error.message, true);
      button.disabled = false;
    }
  }
}

// -- start ---------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("#auth").addEventListener("submit", useToken);
  document.addEventListener("visibilitychange", schedule);
  schedule();
});
