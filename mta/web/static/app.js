// mta's lab inbox: the message list, a message, the queue. Plain JavaScript, no build step.
//
// Everything that comes from mail (addresses, subjects, headers, file names, text) is
// hostile: it reaches the page only as text (textContent, attribute values set through
// the DOM), never as markup. The HTML part is shown only inside <iframe sandbox> from
// /view/ID.html, which runs no script and loads nothing remote.
"use strict";

const PAGE_SIZE = 50;
const QUEUE_POLL_MS = 2000;

const state = {
  start: 0,           // paging of the list
  query: "",          // the search, in Mailpit's language ("" = the plain list)
  mailbox: "",        // ?mailbox= (one lab mailbox, "" = all)
  openId: null,       // the message shown
  total: 0,
  mailboxes: new Set(),
  reloadTimer: null,
  queueTimer: null,
};

const $ = (id) => document.getElementById(id);

// An element with attributes and children; strings become text nodes, never markup.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return node;
}

// ------------------------------------------------------------------ requests

class ApiError extends Error {}

// fetch() sends this page's Origin with every POST, PUT and DELETE: the server checks it.
async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new ApiError("the server cannot be reached");
  }
  if (!response.ok) {
    const text = (await response.text()).trim().split("\n")[0];
    throw new ApiError(text || `${response.status} ${response.statusText}`);
  }
  const type = response.headers.get("Content-Type") || "";
  return type.includes("json") ? response.json() : response.text();
}

function showStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
  status.hidden = !text;
}

function reportError(err) {
  showStatus(err instanceof ApiError ? err.message : String(err), true);
}

// ------------------------------------------------------------------ formatting

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} kB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function formatTime(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return iso || "";
  const now = new Date();
  if (when.toDateString() === now.toDateString()) return when.toLocaleTimeString();
  return when.toLocaleString();
}

function formatAddress(a) {
  if (!a) return "";
  return a.Name ? `${a.Name} <${a.Address}>` : a.Address;
}

function formatAddresses(list) {
  return (list || []).map(formatAddress).join(", ");
}

// ------------------------------------------------------------------ the list

function listPath() {
  const params = new URLSearchParams({ start: state.start, limit: PAGE_SIZE });
  if (state.mailbox) params.set("mailbox", state.mailbox);
  if (state.query) {
    params.set("query", state.query);
    return `/api/v1/search?${params}`;
  }
  return `/api/v1/messages?${params}`;
}

async function loadList() {
  let page;
  try {
    page = await api("GET", listPath());
  } catch (err) {
    reportError(err);
    return;
  }
  if (page.messages.length === 0 && state.start > 0 && page.messages_count > 0) {
    state.start = Math.max(0, state.start - PAGE_SIZE);   // the page emptied under us
    return loadList();
  }
  state.total = page.messages_count;
  renderList(page);
}

function renderList(page) {
  const body = $("messages").tBodies[0];
  body.replaceChildren(...page.messages.map(messageRow));
  $("list-empty").hidden = page.messages.length > 0;
  const first = page.messages.length ? page.start + 1 : 0;
  const last = page.start + page.messages.length;
  const what = state.query ? "matching" : "messages";
  $("list-counts").textContent =
    `${first}\u2013${last} of ${page.messages_count} ${what}, ${page.messages_unread} unread` +
    (state.query || state.mailbox ? ` (${page.total} in ${state.mailbox || "all mailboxes"})` : "");
  $("page-prev").disabled = state.start === 0;
  $("page-next").disabled = last >= page.messages_count;
  for (const m of page.messages) noteMailboxes(m);
}

function messageRow(m) {
  const from = m.From ? (m.From.Name || m.From.Address) : "";
  const attachments = m.Attachments
    ? [el("img", { src: "/static/paperclip.svg", alt: "attachments", width: "14", height: "14" }),
       m.Attachments > 1 ? String(m.Attachments) : ""]
    : [];
  const row = el("tr", { "data-id": m.ID, tabindex: "0", class: m.Read ? "" : "unread" },
    el("td", { class: "from", title: m.From ? formatAddress(m.From) : "" }, from),
    el("td", { class: "subject" }, el("span", {}, m.Subject || "(no subject)"),
       el("span", { class: "snippet" }, m.Snippet || "")),
    el("td", { class: "to" }, (m.To || []).map((a) => a.Address).join(", ")),
    el("td", { class: "num files", title: m.Attachments ? `${m.Attachments} attachment(s)` : null }, ...attachments),
    el("td", { class: "num size" }, formatSize(m.Size)),
    el("td", { class: "when", title: m.Created }, formatTime(m.Created)));
  if (m.ID === state.openId) row.classList.add("selected");
  row.addEventListener("click", () => { location.hash = `#/message/${encodeURIComponent(m.ID)}`; });
  row.addEventListener("keydown", (e) => { if (e.key === "Enter") row.click(); });
  return row;
}

// The mailbox filter offers the lab mailboxes seen so far (the entries' own list, if the
// API gives one, else their To addresses).
function noteMailboxes(m) {
  const found = m.Mailboxes || (m.To || []).map((a) => a.Address);
  let added = false;
  for (const address of found) {
    const key = String(address).toLowerCase();
    if (!state.mailboxes.has(key)) { state.mailboxes.add(key); added = true; }
  }
  if (added) {
    $("mailbox-list").replaceChildren(...[...state.mailboxes].sort().map((a) => el("option", { value: a })));
  }
}

// Events come in bursts (a message to ten mailboxes, a delete of all): one reload for each burst.
function scheduleReload() {
  if (state.reloadTimer) return;
  state.reloadTimer = setTimeout(() => { state.reloadTimer = null; loadList(); }, 100);
}

// ------------------------------------------------------------------ one message

async function openMessage(id) {
  state.openId = id;
  for (const row of $("messages").tBodies[0].rows) row.classList.toggle("selected", row.dataset.id === id);
  let m;
  try {
    m = await api("GET", `/api/v1/message/${encodeURIComponent(id)}`);   // marks it read
  } catch (err) {
    reportError(err);
    closeMessage();
    return;
  }
  if (state.openId !== id) return;
  renderMessage(m);
  const row = $("messages").querySelector(`tr[data-id="${CSS.escape(id)}"]`);
  if (row) row.classList.remove("unread");
  showTab(m.HTML ? "html" : "text");
}

function renderMessage(m) {
  $("message-pane").hidden = false;
  $("inbox-view").classList.add("reading");
  $("msg-subject").textContent = m.Subject || "(no subject)";
  const meta = [["From", formatAddress(m.From)], ["To", formatAddresses(m.To)], ["Cc", formatAddresses(m.Cc)],
    ["Reply-To", formatAddresses(m.ReplyTo)], ["Date", m.Date ? new Date(m.Date).toLocaleString() : ""],
    ["Mailboxes", (m.Mailboxes || []).join(", ")], ["Size", formatSize(m.Size)], ["ID", m.ID]];
  $("msg-meta").replaceChildren(...meta.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const parts = [...(m.Attachments || []), ...(m.Inline || []).map((p) => ({ ...p, inline: true }))];
  $("msg-attachments").replaceChildren(...parts.map((p) => attachmentItem(m.ID, p)));
  $("tab-text").textContent = m.Text || "";
  // The HTML part: sandboxed, loaded from the server's /view/ID.html, never written into a document here.
  const frame = $("msg-html");
  $("msg-no-html").hidden = !!m.HTML;
  frame.hidden = !m.HTML;
  frame.src = m.HTML ? `/view/${encodeURIComponent(m.ID)}.html` : "about:blank";
  $("tab-headers").tBodies[0].replaceChildren();
  $("tab-raw").textContent = "";
  $("release-to").value = "";
}

function attachmentItem(id, part) {
  const href = `/api/v1/message/${encodeURIComponent(id)}/part/${encodeURIComponent(part.PartID)}`;
  const name = part.FileName || `part ${part.PartID}`;
  return el("li", {},
    el("a", { href, download: name, class: "attachment" }, name),
    ` ${part.ContentType || ""}, ${formatSize(part.Size || 0)}${part.inline ? ", inline" : ""}`);
}

async function showTab(name) {
  for (const button of document.querySelectorAll(".tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === name));
  }
  for (const tab of ["html", "text", "headers", "raw"]) $(`tab-${tab}`).hidden = tab !== name;
  const id = state.openId;
  try {
    if (name === "headers" && !$("tab-headers").tBodies[0].rows.length) {
      const headers = await api("GET", `/api/v1/message/${encodeURIComponent(id)}/headers`);
      if (state.openId !== id) return;
      const rows = Object.keys(headers).sort().flatMap((key) =>
        headers[key].map((value) => el("tr", {}, el("td", {}, key), el("td", {}, value))));
      $("tab-headers").tBodies[0].replaceChildren(...rows);
    } else if (name === "raw" && !$("tab-raw").textContent) {
      const raw = await api("GET", `/api/v1/message/${encodeURIComponent(id)}/raw`);
      if (state.openId === id) $("tab-raw").textContent = raw;
    }
  } catch (err) {
    reportError(err);
  }
}

function closeMessage() {
  state.openId = null;
  $("message-pane").hidden = true;
  $("inbox-view").classList.remove("reading");
  $("msg-html").src = "about:blank";
  for (const row of $("messages").tBodies[0].rows) row.classList.remove("selected");
}

async function deleteOpenMessage() {
  const id = state.openId;
  try {
    await api("DELETE", "/api/v1/messages", { IDs: [id] });
  } catch (err) {
    reportError(err);
    return;
  }
  showStatus(`Deleted ${id}.`);
  location.hash = "#/";
  loadList();
}

async function markOpenUnread() {
  const id = state.openId;
  try {
    await api("PUT", "/api/v1/messages", { IDs: [id], Read: false });
  } catch (err) {
    reportError(err);
    return;
  }
  const row = $("messages").querySelector(`tr[data-id="${CSS.escape(id)}"]`);
  if (row) row.classList.add("unread");
  showStatus(`Marked ${id} unread.`);
}

// All the list shows (every page): the search and the mailbox filter as one search.
async function markAllRead() {
  const search = [state.mailbox ? `mailbox:${state.mailbox}` : "", state.query].filter(Boolean).join(" ");
  try {
    await api("PUT", "/api/v1/messages", search ? { Read: true, Search: search } : { Read: true });
  } catch (err) {
    reportError(err);
    return;
  }
  loadList();
}

async function releaseOpenMessage(event) {
  event.preventDefault();
  const id = state.openId;
  const to = $("release-to").value.split(/[\s,;]+/).filter(Boolean);
  if (!to.length) {
    showStatus("Give the address to release the message to.", true);
    return;
  }
  try {
    await api("POST", `/api/v1/message/${encodeURIComponent(id)}/release`, { To: to });
  } catch (err) {
    reportError(err);
    return;
  }
  showStatus(`Released ${id} to ${to.join(", ")}: queued for delivery (see the queue).`);
}

// ------------------------------------------------------------------ the queue (web mailq)

async function loadQueue() {
  let page;
  try {
    page = await api("GET", "/api/mta/queue");
  } catch (err) {
    reportError(err);
    return;
  }
  const selected = new Set(selectedQueueIds());
  $("queue").tBodies[0].replaceChildren(...page.messages.map((m) => queueRow(m, selected.has(m.ID))));
  $("queue-empty").hidden = page.total > 0;
  const shown = page.count < page.total ? ` (first ${page.count} shown)` : "";
  $("queue-counts").textContent =
    `${page.total} message${page.total === 1 ? "" : "s"}: ${page.active} active, ` +
    `${page.deferred} deferred, ${page.hold} on hold${shown}`;
}

function queueRow(m, checked) {
  const box = el("input", { type: "checkbox", "aria-label": `select ${m.ID}` });
  box.checked = checked;
  const rcpts = m.Recipients.map((r) => el("div", {},
    `${r.Address} `, el("span", { class: `state state-${r.State}` }, r.State),
    r.Attempts ? ` ${r.Attempts} attempt${r.Attempts === 1 ? "" : "s"}` : "",
    r.LastError ? el("div", { class: "error" }, r.LastError) : null));
  return el("tr", { "data-id": m.ID },
    el("td", {}, box),
    el("td", { class: "id" }, m.ID),
    el("td", {}, el("span", { class: `state state-${m.Queue}` }, m.Queue)),
    el("td", { class: "when", title: m.Arrival }, formatTime(m.Arrival)),
    el("td", { class: "num" }, formatSize(m.Size)),
    el("td", {}, m.Sender || "MAILER-DAEMON"),
    el("td", { class: "rcpts" }, ...rcpts));
}

function selectedQueueIds() {
  return [...$("queue").tBodies[0].rows]
    .filter((row) => row.cells[0].firstChild.checked)
    .map((row) => row.dataset.id);
}

async function queueAction(action) {
  const ids = selectedQueueIds();
  if (!ids.length) {
    showStatus("Select messages in the queue first.", true);
    return;
  }
  let result;
  try {
    result = await api("POST", `/api/mta/queue/${action}`, { IDs: ids });
  } catch (err) {
    reportError(err);
    return;
  }
  const missing = result.NotFound.length ? ` (no longer queued: ${result.NotFound.join(", ")})` : "";
  const changed = Object.values(result.Changed).reduce((a, b) => a + b, 0);
  const done = { hold: "Held", release: "Released", flush: "Flushed", delete: "Deleted" }[action];
  showStatus(`${done} ${result.Found.join(", ") || "nothing"}: ${changed} recipient${changed === 1 ? "" : "s"}` +
             missing);
  $("queue-all").checked = false;
  loadQueue();
}

// ------------------------------------------------------------------ live events

function connectEvents() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/api/events`);
  let wasOpen = false;
  socket.addEventListener("open", () => {
    wasOpen = true;
    setLive(true);
    scheduleReload();   // whatever happened while we were away
  });
  socket.addEventListener("message", (event) => {
    let data;
    try { data = JSON.parse(event.data); } catch (err) { return; }
    const type = data.Type || data.type;
    const id = data.Data && data.Data.ID;
    if (type === "delete" && id && id === state.openId) {
      showStatus(`${id} was deleted.`);
      location.hash = "#/";
    }
    if (type !== "stats") scheduleReload();
  });
  socket.addEventListener("close", () => {
    setLive(false);
    setTimeout(connectEvents, wasOpen ? 500 : 3000);
  });
}

function setLive(on) {
  $("live").className = on ? "online" : "offline";
  $("live").textContent = on ? "live" : "offline";
}

// ------------------------------------------------------------------ routing

// #/ the list, #/message/ID the list with one message open, #/queue the queue.
function route() {
  const hash = location.hash || "#/";
  const queue = hash === "#/queue";
  $("inbox-view").hidden = queue;
  $("queue-view").hidden = !queue;
  $("search-form").hidden = queue;
  $("nav-inbox").classList.toggle("current", !queue);
  $("nav-queue").classList.toggle("current", queue);
  clearInterval(state.queueTimer);
  if (queue) {
    document.title = "mta queue";
    loadQueue();
    state.queueTimer = setInterval(() => { if (!document.hidden) loadQueue(); }, QUEUE_POLL_MS);
    return;
  }
  document.title = "mta lab inbox";
  const match = hash.match(/^#\/message\/(.+)$/);
  if (match) openMessage(decodeURIComponent(match[1]));
  else closeMessage();
}

function search(event) {
  event.preventDefault();
  state.query = $("search").value.trim();
  state.mailbox = $("mailbox").value.trim();
  state.start = 0;
  showStatus("");
  loadList();
}

function init() {
  $("search-form").addEventListener("submit", search);
  $("search-clear").addEventListener("click", () => {
    $("search").value = "";
    $("mailbox").value = "";
    $("search-form").requestSubmit();
  });
  $("page-prev").addEventListener("click", () => { state.start = Math.max(0, state.start - PAGE_SIZE); loadList(); });
  $("page-next").addEventListener("click", () => { state.start += PAGE_SIZE; loadList(); });
  $("mark-all-read").addEventListener("click", markAllRead);
  $("msg-close").addEventListener("click", () => { location.hash = "#/"; });
  $("msg-delete").addEventListener("click", deleteOpenMessage);
  $("msg-unread").addEventListener("click", markOpenUnread);
  $("release-form").addEventListener("submit", releaseOpenMessage);
  for (const button of document.querySelectorAll(".tabs button")) {
    button.addEventListener("click", () => showTab(button.dataset.tab));
  }
  for (const button of document.querySelectorAll("[data-queue-action]")) {
    button.addEventListener("click", () => queueAction(button.dataset.queueAction));
  }
  $("queue-refresh").addEventListener("click", loadQueue);
  $("queue-all").addEventListener("change", () => {
    for (const row of $("queue").tBodies[0].rows) row.cells[0].firstChild.checked = $("queue-all").checked;
  });
  window.addEventListener("hashchange", route);
  // /view/ID (Mailpit's address of one message, where /view/latest leads): that message.
  const view = location.pathname.match(/^\/view\/([^/]+)$/);
  if (view) history.replaceState(null, "", `/#/message/${view[1]}`);
  loadList();
  route();
  connectEvents();
}

init();
