// The operator page. It only calls this server's public API with the credential the operator
// typed (kept in sessionStorage, gone when the tab closes), so the API's auth decides what it
// shows. Every value from the API is put into the page as text, never as HTML.
//
// Live events: the browser's EventSource cannot send an Authorization header, and a key in the
// URL would land in logs and history. So the page reads the SSE stream with fetch() and a
// stream reader, sending the header, and resumes after a dropped connection with the
// Last-Event-ID header set to the last id it saw, as EventSource itself would.
"use strict";

const KEY = "agentos.credential";
const TERMINAL = new Set(["RunPaused", "RunCompleted", "RunError", "RunCancelled"]);
const POLL_MS = 3000;
const MAX_RECONNECTS = 20;

// `generation` counts sign-ins: answers that arrive for an earlier one are dropped.
const state = { canResolve: false, agents: [], follow: null, runKey: null, generation: 0 };
const $ = (id) => document.getElementById(id);

function credential() { return sessionStorage.getItem(KEY) || ""; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (credential()) h["Authorization"] = "Bearer " + credential();
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text || "";
  box.hidden = !text;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const answer = await fetch(path, opts);
  const text = await answer.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = null; }
  if (!answer.ok) {
    const err = new Error((body && body.detail) || answer.status + " " + answer.statusText);
    err.status = answer.status;
    throw err;
  }
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function pre(value) { return el("pre", JSON.stringify(value, null, 1)); }

function cell(row, content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content ?? "";
  row.appendChild(td);
  return td;
}

function age(epoch) {
  const s = Math.max(0, Math.round(Date.now() / 1000 - epoch));
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

function when(epoch) { return epoch ? new Date(epoch * 1000).toISOString().replace("T", " ").slice(0, 19) : ""; }

// -- who may do what, asked of the API itself ---------------------------------------------

// There is no "who am I" endpoint in the contract. Resolving an approval that does not exist
// is checked for credentials and role before the approval is looked up, and changes nothing:
// 404 means this caller may resolve, 403 means it may not.
async function probeResolve() {
  try {
    await api("/approvals/console-permission-probe/resolve", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ status: "approved" }),
    });
    return true;
  } catch (err) {
    return err.status === 404;
  }
}

async function signIn() {
  const generation = ++state.generation;
  showError("");
  let agents, canResolve;
  try {
    agents = await api("/agents");
    canResolve = await probeResolve();
  } catch (err) {
    if (generation !== state.generation) return;
    $("whoami").textContent = err.status === 401 ? "Type the key or token the API expects." : "";
    showError(err.message);
    return;
  }
  if (generation !== state.generation) return;
  state.agents = agents;
  state.canResolve = canResolve;
  $("whoami").textContent = (credential() ? "Signed in" : "No credential (open server)") +
    (state.canResolve ? ": may resolve approvals" : ": read-only for approvals");
  fillAgents();
  await Promise.all([loadApprovals(), loadRuns()]);
  openLinkedRun();
}

// `/console#run=<agent_id>/<run_id>` opens that run (a link a webhook receiver can post).
function openLinkedRun() {
  const match = /^#run=([^/]+)\/(.+)$/.exec(location.hash);
  if (match) openRun(decodeURIComponent(match[1]), decodeURIComponent(match[2])).catch((err) => showError(err.message));
}
window.addEventListener("hashchange", openLinkedRun);

function fillAgents() {
  const select = $("filter-agent");
  while (select.options.length > 1) select.remove(1);
  for (const agent of state.agents) select.appendChild(new Option(agent.name || agent.id, agent.id));
}

// -- approvals ----------------------------------------------------------------------------

async function loadApprovals() {
  const generation = state.generation;
  let page;
  try {
    page = await api("/approvals?status=pending&limit=100");
    if (generation !== state.generation) return;
  } catch (err) {
    if (generation !== state.generation) return;
    if (err.status === 403) { $("approvals-section").hidden = true; return; }
    throw err;
  }
  $("approvals-section").hidden = false;
  $("approvals-readonly").hidden = state.canResolve;
  // Rows already shown are kept (a note being typed survives the refresh); new ones are
  // added in the API's order, resolved ones removed.
  const body = $("approvals").tBodies[0];
  const shown = new Map([...body.rows].map((row) => [row.dataset.approvalId, row]));
  const rows = page.data.map((approval) => {
    const row = shown.get(approval.id) || approvalRow(approval);
    if (row.dataset.canResolve !== String(state.canResolve)) return approvalRow(approval);
    row.cells[4].textContent = age(approval.created_at);
    return row;
  });
  rows.forEach((row, i) => { if (body.rows[i] !== row) body.insertBefore(row, body.rows[i] || null); });
  while (body.rows.length > rows.length) body.deleteRow(rows.length);
  $("approvals-count").textContent = String(page.meta.total_count);
  $("approvals-empty").hidden = page.data.length > 0;
}

function approvalRow(approval) {
  const row = document.createElement("tr");
  row.dataset.approvalId = approval.id;
  row.dataset.canResolve = String(state.canResolve);
  cell(row, approval.agent_id);
  cell(row, approval.tool_name);
  cell(row, pre(approval.tool_args));
  cell(row, approval.user_id || "");
  cell(row, age(approval.created_at));
  const open = el("a", approval.run_id.slice(0, 8));
  open.href = "#";
  open.addEventListener("click", (e) => { e.preventDefault(); openRun(approval.agent_id, approval.run_id); });
  cell(row, open);
  const act = cell(row, "");
  act.className = "act";
  if (state.canResolve) {
    const note = el("input");
    note.placeholder = "note";
    note.className = "note";
    act.append(note, decisionButton("Approve", "approved", approval, note),
               decisionButton("Reject", "rejected", approval, note));
  }
  return row;
}

function decisionButton(label, status, approval, note) {
  const button = el("button", label, status === "approved" ? "approve" : "reject");
  button.type = "button";
  button.addEventListener("click", () => decide(approval, status, note.value, button));
  return button;
}

// Resolve, then continue the run with empty tools (the contract's way to apply a decision),
// and follow the continue's own event stream in the run view.
async function decide(approval, status, note, button) {
  button.disabled = true;
  showError("");
  try {
    const data = note ? { note: note } : {};
    await api("/approvals/" + encodeURIComponent(approval.id) + "/resolve", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ status: status, resolution_data: data }),
    });
    await openRun(approval.agent_id, approval.run_id, { continueRun: true });
  } catch (err) {
    showError(err.message);
  } finally {
    button.disabled = false;
    loadApprovals().catch((err) => showError(err.message));
  }
}

// -- runs ---------------------------------------------------------------------------------

async function loadRuns() {
  const agent = $("filter-agent").value;
  const status = $("filter-status").value;
  const ids = agent ? [agent] : state.agents.map((a) => a.id);
  const query = "?limit=50" + (status ? "&status=" + encodeURIComponent(status) : "");
  const generation = state.generation;
  const lists = await Promise.all(ids.map((id) =>
    api("/agents/" + encodeURIComponent(id) + "/runs" + query)));
  if (generation !== state.generation) return;
  const runs = lists.flat().sort((a, b) => b.created_at - a.created_at).slice(0, 100);
  $("runs").tBodies[0].replaceChildren(...runs.map(runRow));
}

function runRow(run) {
  const row = document.createElement("tr");
  row.dataset.runId = run.run_id;
  cell(row, run.run_id.slice(0, 8));
  cell(row, run.agent_id);
  cell(row, el("span", run.status, "status " + run.status));
  cell(row, run.user_id || "");
  cell(row, when(run.created_at));
  cell(row, (run.content || "").slice(0, 80));
  row.addEventListener("click", () => openRun(run.agent_id, run.run_id));
  return row;
}

async function openRun(agentId, runId, options) {
  const opts = options || {};
  stopFollowing();
  state.runKey = agentId + "/" + runId;
  $("run-section").hidden = false;
  $("run-id").textContent = runId;
  $("events").replaceChildren();
  const run = await showRun(agentId, runId);
  const base = "/agents/" + encodeURIComponent(agentId) + "/runs/" + encodeURIComponent(runId);
  if (opts.continueRun) {
    const form = new URLSearchParams({ tools: "[]", stream: "true" });
    follow(agentId, runId, { method: "POST", url: base + "/continue", body: form, after: lastShown(run) });
  } else {
    (run.events || []).forEach((event, i) => addEvent(event, i + 1));
    if (run.status === "RUNNING") {
      const seen = (run.events || []).length;
      follow(agentId, runId, { url: base + "/events", after: seen, lastEventId: seen });
    }
  }
  $("run-section").scrollIntoView({ block: "start" });
}

function lastShown(run) {
  (run.events || []).forEach((event, i) => addEvent(event, i + 1));
  return (run.events || []).length;
}

async function showRun(agentId, runId) {
  const run = await api("/agents/" + encodeURIComponent(agentId) + "/runs/" + encodeURIComponent(runId));
  const badge = $("run-status");
  badge.textContent = run.status;
  badge.className = "status " + run.status;
  $("transcript").replaceChildren(...(run.messages || []).map(messageItem));
  $("tool-calls").tBodies[0].replaceChildren(...(run.tools || []).map(toolRow));
  return run;
}

function messageItem(message) {
  const item = el("li", null, "msg " + message.role);
  item.appendChild(el("span", message.role + (message.tool_name ? " (" + message.tool_name + ")" : ""), "role"));
  item.appendChild(el("span", message.content ?? ""));
  for (const call of message.tool_calls || []) {
    const fn = call.function || call;
    item.appendChild(el("div", "calls " + (fn.name || call.tool_name || "") + " " +
      (typeof fn.arguments === "string" ? fn.arguments : JSON.stringify(fn.arguments || call.tool_args || {})), "muted"));
  }
  return item;
}

function decision(tool) {
  if (tool.approval_type === "required" && tool.confirmed === null) return "waiting for an admin";
  if (tool.requires_confirmation) return "waiting for confirmation";
  if (tool.requires_user_input) return "waiting for user input";
  if (tool.external_execution_required) return "waiting for external execution";
  if (tool.confirmed === true) return "confirmed" + (tool.approval_type ? " (approved)" : "");
  if (tool.confirmed === false) return "rejected" + (tool.confirmation_note ? ": " + tool.confirmation_note : "");
  if (tool.answered) return "answered";
  return tool.tool_call_error ? "error" : "executed";
}

function toolRow(tool) {
  const row = document.createElement("tr");
  cell(row, tool.tool_call_id);
  cell(row, tool.tool_name);
  cell(row, pre(tool.tool_args));
  cell(row, decision(tool));
  cell(row, tool.result ?? "");
  return row;
}

function addEvent(event, id) {
  const item = el("li");
  item.dataset.event = event.event;
  item.appendChild(el("span", (id ? id + " " : "") + event.event, "name"));
  const detail = event.content || event.reason || (event.tool && event.tool.tool_name) || "";
  if (detail) item.appendChild(el("span", " " + String(detail).slice(0, 200)));
  $("events").appendChild(item);
  item.scrollIntoView({ block: "nearest" });
}

// -- live events: an SSE reader over fetch() -----------------------------------------------

function stopFollowing() {
  if (state.follow) state.follow.abort();
  state.follow = null;
  $("live").textContent = "";
}

function follow(agentId, runId, request) {
  const control = new AbortController();
  state.follow = control;
  const key = agentId + "/" + runId;
  const resume = "/agents/" + encodeURIComponent(agentId) + "/runs/" + encodeURIComponent(runId) + "/events";
  let last = request.after || 0;
  let attempt = 0;
  let ended = false;
  const onEvent = (id, name, data) => {
    if (id) last = Number(id);
    if (!data) return;
    let event;
    try { event = JSON.parse(data); } catch (e) { return; }
    addEvent(event, id);
    if (TERMINAL.has(event.event)) ended = true;
    showRun(agentId, runId).catch(() => {});
  };
  const loop = async () => {
    let current = request;
    while (!ended && !control.signal.aborted && attempt <= MAX_RECONNECTS) {
      $("live").textContent = "(following live)";
      try {
        await readStream(current, control.signal, onEvent);
        if (!ended) break; // the server closed the stream: the run is not executing
      } catch (err) {
        if (control.signal.aborted) return;
        if (err.status && err.status < 500) { showError(err.message); break; }
        attempt += 1;
        $("live").textContent = "(reconnecting)";
        await new Promise((resolve) => setTimeout(resolve, Math.min(5000, 250 * 2 ** attempt)));
      }
      current = { url: resume, lastEventId: last };
    }
    if (state.runKey === key && !control.signal.aborted) {
      $("live").textContent = ended ? "(run stopped)" : "";
      await showRun(agentId, runId).catch(() => {});
      loadRuns().catch(() => {});
    }
  };
  loop();
}

async function readStream(request, signal, onEvent) {
  const extra = { Accept: "text/event-stream" };
  if (request.lastEventId) extra["Last-Event-ID"] = String(request.lastEventId);
  const answer = await fetch(request.url, {
    method: request.method || "GET", headers: headers(extra), body: request.body, signal: signal,
  });
  if (!answer.ok) {
    let detail = answer.status + " " + answer.statusText;
    try { detail = (await answer.json()).detail || detail; } catch (e) { /* not JSON */ }
    const err = new Error(detail);
    err.status = answer.status;
    throw err;
  }
  const reader = answer.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      dispatch(frame, onEvent);
    }
  }
}

function dispatch(frame, onEvent) {
  let id = null, name = null;
  const data = [];
  for (const line of frame.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (id || data.length) onEvent(id, name, data.join("\n"));
}

// -- wiring -------------------------------------------------------------------------------

$("auth-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("credential").value.trim());
  $("credential").value = "";
  signIn();
});
$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  stopFollowing();
  location.reload();
});
$("run-filter").addEventListener("submit", (e) => {
  e.preventDefault();
  loadRuns().catch((err) => showError(err.message));
});

setInterval(() => {
  if (document.hidden || !state.agents.length) return;
  loadApprovals().catch(() => {});
}, POLL_MS);

signIn();
