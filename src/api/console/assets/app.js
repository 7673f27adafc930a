// refiner-gateway console: plain JavaScript, no dependencies.
// Data is only ever rendered as DOM text (textContent, createTextNode): never as markup.
'use strict';

const state = { csrf: null, sources: [], page: null, stop: [] };

// ---------- DOM helpers ----------

/** An element with attributes (`on*` are listeners, `class` the class) and children. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'value') el.value = value;
    else if (name === 'checked') el.checked = Boolean(value);
    else el.setAttribute(name, value === true ? '' : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

function json(value) {
  return h('pre', { class: 'json' }, JSON.stringify(value, null, 2));
}

function when(text) {
  if (!text) return '';
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? String(text) : date.toISOString().replace('T', ' ').replace('Z', ' UTC');
}

function status(text, isError) {
  const el = document.getElementById('status');
  el.textContent = text || '';
  el.className = isError ? 'status error' : 'status';
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.error ? body.error : {};
    super(detail.message || `HTTP ${status}`);
    this.status = status;
    this.reason = detail.reason;
  }
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-CSRF-Token'] = state.csrf || '';
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let parsed = null;
  try { parsed = text ? JSON.parse(text) : null; } catch (_) { parsed = null; }
  if (!response.ok) {
    if (response.status === 401) showSignIn('Your session has ended; sign in again.');
    throw new ApiError(response.status, parsed);
  }
  return parsed;
}

/** Runs `work`, showing its error in the status line. */
async function attempt(work) {
  try {
    return await work();
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) status(e.message, true);
    return undefined;
  }
}

// ---------- sign-in ----------

function showSignIn(message) {
  stopPage();
  state.csrf = null;
  document.getElementById('top').hidden = true;
  document.getElementById('page').hidden = true;
  document.getElementById('sign-in-page').hidden = false;
  document.getElementById('sign-in-error').textContent = message || '';
  document.getElementById('token').focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById('token');
  const response = await fetch('/console/session', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
    credentials: 'same-origin',
    body: JSON.stringify({ token: input.value }),
  });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && body.error ? body.error.message : `HTTP ${response.status}`;
    document.getElementById('sign-in-error').textContent = detail;
    return;
  }
  input.value = '';
  state.csrf = body.csrf_token;
  await startConsole();
}

async function signOut() {
  await attempt(() => api('DELETE', '/console/session'));
  showSignIn('Signed out.');
}

async function startConsole() {
  document.getElementById('sign-in-page').hidden = true;
  document.getElementById('top').hidden = false;
  document.getElementById('page').hidden = false;
  const overview = await attempt(() => api('GET', '/api/overview'));
  state.sources = overview && overview.sources ? overview.sources.map((x) => x.source) : [];
  route();
}

// ---------- pages ----------

const pages = {
  overview: overviewPage,
  live: livePage,
  find: findPage,
  'dead-letters': deadLettersPage,
  playground: playgroundPage,
};

function stopPage() {
  for (const stop of state.stop) stop();
  state.stop = [];
}

function route() {
  if (!state.csrf) return;
  const name = location.hash.replace(/^#/, '') || 'overview';
  const render = pages[name] || overviewPage;
  stopPage();
  status('');
  for (const link of document.querySelectorAll('nav a')) {
    link.classList.toggle('active', link.dataset.page === name);
  }
  const page = clear(document.getElementById('page'));
  page.dataset.page = name;
  render(page);
}

function sourceSelect(id, withAll) {
  const select = h('select', { id, name: 'source' });
  if (withAll) select.appendChild(h('option', { value: '' }, 'all sources'));
  for (const source of state.sources) select.appendChild(h('option', { value: source }, source));
  return select;
}

function field(label, control) {
  return h('label', { class: 'field' }, h('span', {}, label), control);
}

// ---------- overview ----------

function overviewPage(page) {
  const body = h('div', { id: 'overview' }, 'Loading…');
  page.append(h('h1', {}, 'Overview'), h('p', { class: 'hint' }, 'The last hour, per minute; refreshed every 5 seconds.'), body);
  const load = async () => {
    const overview = await attempt(() => api('GET', '/api/overview'));
    if (!overview) return;
    clear(body);
    body.append(h('p', { class: 'hint' }, `As of ${when(overview.generated_at)}`));
    for (const source of overview.sources || []) body.appendChild(sourceCard(source));
  };
  load();
  const timer = setInterval(load, 5000);
  state.stop.push(() => clearInterval(timer));
}

function sourceCard(source) {
  const minutes = source.minutes || [];
  const series = (pick) => minutes.map((m) => Number(pick(m)) || 0);
  const skipped = {};
  for (const m of minutes) {
    for (const [reason, n] of Object.entries(m.skipped || {})) {
      (skipped[reason] = skipped[reason] || new Array(minutes.length).fill(0));
    }
  }
  minutes.forEach((m, i) => {
    for (const [reason, n] of Object.entries(m.skipped || {})) skipped[reason][i] = Number(n) || 0;
  });
  const latency = source.latency_ms;
  const usage = source.usage;
  return h('article', { class: 'card', 'data-source': source.source },
    h('h2', {}, source.source),
    h('dl', { class: 'facts' },
      fact('Backlog', source.backlog),
      fact('Oldest event', source.oldest_age_secs == null ? '—' : `${Math.round(source.oldest_age_secs)} s`),
      fact('Breaker', h('span', { class: `breaker ${source.breaker}` }, source.breaker)),
      fact('Concurrency', source.concurrency),
      fact('Latency p50/p90/p99', latency ? `${latency.p50} / ${latency.p90} / ${latency.p99} ms` : '—'),
      fact(`Usage ${usage ? usage.month : ''}`, usage ? `MTU ${usage.mtu} · MTE ${usage.mte} · MPV ${usage.mpv}` : '—')),
    h('div', { class: 'charts' },
      chart('received', series((m) => m.received)),
      chart('forwarded', series((m) => m.forwarded)),
      chart('retried', series((m) => m.retried)),
      chart('dead', series((m) => m.dead)),
      stackedChart('skipped by reason', skipped)));
}

function fact(name, value) {
  return [h('dt', {}, name), h('dd', {}, value == null ? '—' : value)];
}

const W = 240;
const H = 48;

/** A sparkline of one series, with its total. */
function chart(name, values) {
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? W / (values.length - 1) : W;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(H - (v / max) * (H - 2) - 1).toFixed(1)}`);
  const total = values.reduce((a, b) => a + b, 0);
  return h('figure', { class: 'chart', 'data-series': name },
    s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': `${name} per minute` },
      s('polyline', { class: `line ${name}`, points: points.join(' ') })),
    h('figcaption', {}, `${name}: ${total} (max ${max}/min)`));
}

/** Stacked bars of skipped events per minute, one colour class per reason. */
function stackedChart(name, byReason) {
  const reasons = Object.keys(byReason).sort();
  const length = reasons.length ? byReason[reasons[0]].length : 0;
  const totals = Array.from({ length }, (_, i) => reasons.reduce((a, r) => a + byReason[r][i], 0));
  const max = Math.max(1, ...totals);
  const bar = length ? W / length : W;
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': `${name} per minute` });
  for (let i = 0; i < length; i += 1) {
    let y = H;
    reasons.forEach((reason, k) => {
      const height = (byReason[reason][i] / max) * (H - 2);
      if (height <= 0) return;
      y -= height;
      svg.appendChild(s('rect', { class: `bar c${k % 6}`, x: (i * bar).toFixed(1), y: y.toFixed(1), width: Math.max(1, bar - 1).toFixed(1), height: height.toFixed(1) }));
    });
  }
  const legend = reasons.length
    ? reasons.map((reason, k) => h('span', { class: `legend c${k % 6}` }, `${reason}: ${byReason[reason].reduce((a, b) => a + b, 0)}`))
    : [h('span', {}, 'none')];
  return h('figure', { class: 'chart', 'data-series': 'skipped' }, svg, h('figcaption', {}, `${name}: `, legend));
}

// ---------- live events ----------

const MAX_LIVE_ENTRIES = 200;

function livePage(page) {
  const source = sourceSelect('live-source', true);
  const type = h('select', { id: 'live-type' }, ['', 'identify', 'track', 'page', 'screen', 'group', 'alias'].map((t) => h('option', { value: t }, t || 'all types')));
  const eventName = h('input', { id: 'live-event', placeholder: 'event name' });
  const user = h('input', { id: 'live-user', placeholder: 'user id or email' });
  const sampled = h('p', { id: 'live-sampled', class: 'notice' }, 'sampled: 0 not shown');
  const connection = h('span', { id: 'live-state', class: 'hint' }, 'connecting…');
  const list = h('ol', { id: 'live-list', class: 'entries' });
  const apply = h('button', { type: 'submit' }, 'Apply filters');
  const form = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); connect(); } },
    field('Source', source), field('Type', type), field('Event', eventName), field('User', user), apply);
  page.append(h('h1', {}, 'Live events'), form, h('p', {}, connection), sampled, list);
  const entries = new Map();
  let dropped = 0;
  let skipped = 0;
  let stream = null;
  const connect = () => {
    if (stream) stream.close();
    clear(list);
    entries.clear();
    const query = new URLSearchParams();
    for (const [name, el] of [['source', source], ['type', type], ['event', eventName], ['user', user]]) {
      if (el.value.trim()) query.set(name, el.value.trim());
    }
    stream = new EventSource(`/api/live?${query}`);
    stream.onopen = () => { connection.textContent = 'connected: new events appear at the top'; };
    stream.onerror = () => { connection.textContent = 'disconnected; reconnecting…'; };
    stream.addEventListener('event', (e) => liveEvent(list, entries, JSON.parse(e.data)));
    stream.addEventListener('outcome', (e) => liveOutcome(list, entries, JSON.parse(e.data)));
    stream.addEventListener('sampled', (e) => {
      const data = JSON.parse(e.data);
      dropped += Number(data.dropped) || 0;
      skipped += Number(data.skipped) || 0;
      sampled.textContent = `sampled: ${skipped + dropped} not shown (events arrive faster than the page shows them: up to ${data.per_second || 'the page\'s pace'} a second are shown; ingest is not slowed)`;
    });
  };
  connect();
  state.stop.push(() => { if (stream) stream.close(); });
}

function liveEntry(list, entries, messageId) {
  let entry = entries.get(messageId);
  if (entry) return entry;
  const summary = h('span', { class: 'what' }, messageId);
  const outcome = h('span', { class: 'outcome pending' }, 'queued');
  const payload = h('div', { class: 'payload' });
  const calls = h('div', { class: 'calls' }, h('h4', {}, 'Refiner calls'), h('p', { class: 'hint' }, 'not sent yet'));
  const history = h('ul', { class: 'history' });
  const el = h('li', { class: 'entry', 'data-message-id': messageId },
    h('details', {}, h('summary', {}, summary, ' ', outcome), payload, calls, history));
  entry = { el, summary, outcome, payload, calls, history };
  entries.set(messageId, entry);
  list.insertBefore(el, list.firstChild);
  while (list.children.length > MAX_LIVE_ENTRIES) {
    const last = list.lastElementChild;
    entries.delete(last.dataset.messageId);
    list.removeChild(last);
  }
  return entry;
}

function liveEvent(list, entries, event) {
  const entry = liveEntry(list, entries, event.messageId);
  const who = event.userId || event.email || event.anonymousId || '';
  entry.summary.textContent = `${when(event.at)} · ${event.source} · ${event.type}${event.event ? ` "${event.event}"` : ''} · ${who} · ${event.messageId}`;
  clear(entry.payload).append(h('h4', {}, 'Segment payload'), json(event.payload));
}

function outcomeText(o) {
  switch (o.outcome) {
    case 'delivered': return `delivered ${o.status ?? ''} in ${o.latency_ms ?? '?'} ms`;
    case 'retrying': return `retrying${o.status ? ` after ${o.status}` : ''}, next attempt ${when(o.next_attempt_at)}`;
    case 'skipped': return `skipped: ${o.reason || ''}`;
    case 'dead': return `dead-lettered${o.status ? ` after ${o.status}` : ''}${o.reason ? `: ${o.reason}` : ''}`;
    case 'refused': return `refused${o.reason ? `: ${o.reason}` : ''}`;
    default: return String(o.outcome);
  }
}

function renderCalls(container, calls) {
  clear(container).appendChild(h('h4', {}, 'Refiner calls'));
  if (!calls || calls.length === 0) {
    container.appendChild(h('p', { class: 'hint' }, 'none'));
    return;
  }
  for (const call of calls) {
    container.append(h('p', { class: 'call' }, `${call.method} ${call.path}`), json(call.body));
  }
}

function liveOutcome(list, entries, o) {
  const entry = liveEntry(list, entries, o.messageId);
  entry.outcome.textContent = outcomeText(o);
  entry.outcome.className = `outcome ${o.outcome}`;
  entry.el.dataset.outcome = o.outcome;
  if (o.calls) renderCalls(entry.calls, o.calls);
  entry.history.appendChild(h('li', {}, `${when(new Date().toISOString())}: ${outcomeText(o)}`));
}

// ---------- find an event ----------

function findPage(page) {
  const source = sourceSelect('find-source', false);
  const by = h('select', { id: 'find-by' },
    h('option', { value: 'message_id' }, 'messageId'),
    h('option', { value: 'user_id' }, 'user id'),
    h('option', { value: 'email' }, 'email'));
  const value = h('input', { id: 'find-value', required: true, placeholder: 'value' });
  const results = h('div', { id: 'find-results' });
  const form = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); find(); } },
    field('Source', source), field('By', by), field('Value', value), h('button', { type: 'submit' }, 'Find'));
  page.append(h('h1', {}, 'Find an event'), form, results);
  const find = () => attempt(async () => {
    const query = new URLSearchParams({ [by.value]: value.value.trim() });
    const answer = await api('GET', `/api/events/${encodeURIComponent(source.value)}?${query}`);
    clear(results).appendChild(h('p', { class: 'hint' }, `${answer.count} found`));
    for (const event of answer.results || []) results.appendChild(foundEvent(event));
  });
}

function stateText(e) {
  switch (e.state) {
    case 'retrying': return `retrying until ${when(e.next_attempt_at)}`;
    case 'skipped': return `skipped: ${e.reason || ''}`;
    case 'delivered': {
      const last = (e.attempts || [])[e.attempts.length - 1];
      return last ? `delivered at ${when(last.at)} with ${last.status}` : 'delivered';
    }
    default: return e.reason ? `${e.state}: ${e.reason}` : String(e.state);
  }
}

function foundEvent(e) {
  const calls = h('div', { class: 'calls' });
  renderCalls(calls, e.calls);
  const rows = (e.attempts || []).map((a) => h('tr', {},
    h('td', {}, when(a.at)), h('td', {}, a.status ?? ''), h('td', {}, a.latency_ms ?? ''),
    h('td', {}, a.error || ''), h('td', {}, h('pre', { class: 'body' }, a.response_body || ''))));
  return h('article', { class: 'card found', 'data-message-id': e.messageId },
    h('h2', {}, `${e.type}${e.event ? ` "${e.event}"` : ''} · ${e.messageId}`),
    h('dl', { class: 'facts' },
      fact('State', h('span', { class: `state ${e.state}` }, stateText(e))),
      fact('User', e.userId || e.email || ''),
      fact('Received', when(e.received_at))),
    h('h4', {}, 'Attempts'),
    rows.length ? h('table', { class: 'attempts' },
      h('thead', {}, h('tr', {}, ['At', 'Status', 'Latency ms', 'Error', 'Response body'].map((t) => h('th', {}, t)))),
      h('tbody', {}, rows)) : h('p', { class: 'hint' }, 'no attempt yet'),
    calls,
    h('details', {}, h('summary', {}, 'Segment payload'), json(e.payload)));
}

// ---------- dead letters ----------

function deadLettersPage(page) {
  const source = sourceSelect('dl-source', false);
  const q = h('input', { id: 'dl-q', placeholder: 'search' });
  const statusCode = h('input', { id: 'dl-status', placeholder: 'e.g. 400', inputmode: 'numeric', size: 5 });
  const from = h('input', { id: 'dl-from', type: 'datetime-local' });
  const to = h('input', { id: 'dl-to', type: 'datetime-local' });
  const table = h('div', { id: 'dl-table' });
  const detail = h('div', { id: 'dl-detail' });
  const progress = h('p', { id: 'dl-progress', class: 'notice', hidden: true });
  const confirmBox = h('div', { id: 'dl-confirm', class: 'confirm', hidden: true });
  const filters = () => {
    const f = {};
    if (q.value.trim()) f.q = q.value.trim();
    if (statusCode.value.trim()) f.status = statusCode.value.trim();
    if (from.value) f.start_at = new Date(from.value).toISOString();
    if (to.value) f.ends_at = new Date(to.value).toISOString();
    return f;
  };
  const base = () => `/api/events/${encodeURIComponent(source.value)}/dead-letters`;
  const ctx = { source, table, detail, progress, confirmBox, filters, base, selected: new Set() };
  ctx.load = (url) => attempt(() => loadDeadLetters(ctx, url));
  const form = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); ctx.load(); } },
    field('Source', source), field('Search', q), field('Last status', statusCode), field('From', from), field('To', to),
    h('button', { type: 'submit' }, 'Filter'));
  const actions = h('div', { class: 'actions' },
    h('button', { type: 'button', id: 'dl-replay-selected', onclick: () => replaySelected(ctx) }, 'Replay selected'),
    h('button', { type: 'button', id: 'dl-replay-filter', onclick: () => confirmThen(ctx, 'replay', () => replayFilter(ctx)) }, 'Replay all matching'),
    h('button', { type: 'button', id: 'dl-purge', class: 'danger', onclick: () => confirmThen(ctx, 'purge', () => purge(ctx)) }, 'Purge all matching'));
  page.append(h('h1', {}, 'Dead letters'), form, actions, confirmBox, progress, table, detail);
  ctx.load();
}

async function loadDeadLetters(ctx, url) {
  const query = new URLSearchParams(ctx.filters());
  query.set('page_size', '50');
  const answer = await api('GET', url || `${ctx.base()}?${query}`);
  ctx.count = answer.count;
  ctx.selected.clear();
  const rows = (answer.results || []).map((d) => h('tr', { 'data-id': d.id },
    h('td', {}, h('input', { type: 'checkbox', 'aria-label': `select ${d.id}`, onchange: (e) => {
      if (e.target.checked) ctx.selected.add(d.id); else ctx.selected.delete(d.id);
    } })),
    h('td', {}, d.id), h('td', {}, d.printable_name), h('td', {}, d.messageId), h('td', {}, d.attempts),
    h('td', {}, d.last_status ?? ''), h('td', { class: 'error-text' }, d.last_error), h('td', {}, when(d.created_at)),
    h('td', {},
      h('button', { type: 'button', class: 'inspect', onclick: () => attempt(() => inspect(ctx, d.id)) }, 'Inspect'),
      h('button', { type: 'button', class: 'retry', onclick: () => attempt(() => retryOne(ctx, d.id)) }, 'Retry'))));
  const pager = h('p', { class: 'pager' }, `${answer.count} dead letters `,
    answer.previous ? h('button', { type: 'button', onclick: () => ctx.load(localPath(answer.previous)) }, '← previous') : null,
    answer.next ? h('button', { type: 'button', onclick: () => ctx.load(localPath(answer.next)) }, 'next →') : null);
  clear(ctx.table).append(pager, rows.length
    ? h('table', { class: 'dead-letters' },
      h('thead', {}, h('tr', {}, ['', 'Id', 'Event', 'messageId', 'Attempts', 'Status', 'Last error', 'Dead since', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, rows))
    : h('p', { class: 'hint' }, 'No dead letters match.'));
}

/** A same-origin link's path and query (links in answers are absolute URLs). */
function localPath(link) {
  const url = new URL(link, location.href);
  return url.pathname + url.search;
}

async function inspect(ctx, id) {
  const d = await api('GET', `${ctx.base()}/${encodeURIComponent(id)}`);
  const history = (d.history || []).map((a) => h('tr', {},
    h('td', {}, when(a.at)), h('td', {}, a.status ?? ''), h('td', {}, h('pre', { class: 'body' }, a.error || ''))));
  clear(ctx.detail).appendChild(h('article', { class: 'card', id: 'dl-inspected', 'data-id': d.id },
    h('h2', {}, `Dead letter ${d.id}: ${d.printable_name}`),
    h('dl', { class: 'facts' }, fact('messageId', d.messageId), fact('User key', d.user_key),
      fact('Received', when(d.received_at)), fact('Attempts', d.attempts)),
    h('h4', {}, 'History'),
    h('table', { class: 'attempts' }, h('thead', {}, h('tr', {}, ['At', 'Status', 'Refiner answer'].map((t) => h('th', {}, t)))), h('tbody', {}, history)),
    h('h4', {}, 'Payload'), json(d.payload),
    h('button', { type: 'button', class: 'retry', onclick: () => attempt(() => retryOne(ctx, d.id)) }, 'Retry this one')));
}

async function retryOne(ctx, id) {
  const answer = await api('POST', `${ctx.base()}/replay`, { ids: [id] });
  status(`Replayed ${answer.replayed} dead letter(s).`);
  clear(ctx.detail);
  await ctx.load();
}

async function replaySelected(ctx) {
  const ids = Array.from(ctx.selected);
  if (ids.length === 0) { status('Select dead letters first.', true); return; }
  await attempt(async () => {
    const answer = await api('POST', `${ctx.base()}/replay`, { ids });
    status(`Replayed ${answer.replayed} dead letter(s).`);
    await ctx.load();
  });
}

/** Shows an in-page confirmation naming what `action` touches; runs `then` on confirm. */
function confirmThen(ctx, action, then) {
  const f = ctx.filters();
  const described = Object.keys(f).length ? `the ${ctx.count ?? '?'} dead letters matching the filter` : `ALL ${ctx.count ?? '?'} dead letters of ${ctx.source.value}`;
  clear(ctx.confirmBox).append(
    h('p', {}, `${action === 'purge' ? 'Delete' : 'Replay'} ${described}?${action === 'purge' ? ' This cannot be undone.' : ''}`),
    h('button', { type: 'button', id: 'dl-confirm-yes', class: action === 'purge' ? 'danger' : '', onclick: () => { ctx.confirmBox.hidden = true; attempt(then); } }, `Yes, ${action}`),
    h('button', { type: 'button', id: 'dl-confirm-no', onclick: () => { ctx.confirmBox.hidden = true; } }, 'Cancel'));
  ctx.confirmBox.hidden = false;
}

/** Replays the filter's dead letters in steps, showing progress; stops at the ids that
 * existed when it started, so letters that fail again meanwhile are not replayed twice. */
async function replayFilter(ctx) {
  const f = ctx.filters();
  const first = await api('GET', `${ctx.base()}?${new URLSearchParams({ ...f, o: '-id', page_size: '1' })}`).catch(() => null);
  const untilId = first && first.results && first.results[0] ? first.results[0].id : undefined;
  let done = 0;
  ctx.progress.hidden = false;
  for (;;) {
    const body = { ...f, limit: 500 };
    if (untilId !== undefined) body.until_id = untilId;
    const answer = await api('POST', `${ctx.base()}/replay`, body);
    done += answer.replayed;
    ctx.progress.textContent = `Replayed ${done}; ${answer.remaining} remaining…`;
    if (answer.remaining === 0 || answer.replayed === 0) break;
  }
  ctx.progress.textContent = `Replay finished: ${done} replayed.`;
  await ctx.load();
}

async function purge(ctx) {
  const answer = await api('DELETE', ctx.base(), ctx.filters());
  status(`Deleted ${answer.deleted} dead letter(s).`);
  await ctx.load();
}

// ---------- mapping playground ----------

const EXAMPLE_EVENT = {
  type: 'track',
  event: 'Signed Up',
  userId: 'u-123',
  properties: { plan: 'pro' },
  context: { traits: { email: 'ada@example.com' } },
};

function playgroundPage(page) {
  const source = sourceSelect('pg-source', false);
  const input = h('textarea', { id: 'pg-input', rows: 14, spellcheck: 'false' });
  input.value = JSON.stringify(EXAMPLE_EVENT, null, 2);
  const results = h('div', { id: 'pg-results' });
  const form = h('form', { class: 'playground', onsubmit: (e) => { e.preventDefault(); preview(); } },
    field('Source', source), field('Segment event, or {"batch": [...]}', input), h('button', { type: 'submit' }, 'Show the Refiner calls'));
  page.append(h('h1', {}, 'Mapping playground'),
    h('p', { class: 'hint' }, 'Nothing is queued or sent: this shows what delivery would do under the source\'s settings.'), form, results);
  const preview = () => attempt(async () => {
    let body;
    try { body = JSON.parse(input.value); } catch (e) { status(`Not JSON: ${e.message}`, true); return; }
    const answer = await api('POST', `/api/sources/${encodeURIComponent(source.value)}/preview`, body);
    clear(results);
    for (const r of answer.results || []) {
      const calls = h('div', { class: 'calls' });
      renderCalls(calls, r.calls);
      results.appendChild(h('article', { class: 'card preview', 'data-outcome': r.outcome },
        h('h2', {}, `#${r.index} ${r.type || ''} · ${r.outcome}${r.reason ? `: ${r.reason}` : ''}`),
        h('dl', { class: 'facts' }, fact('messageId', r.messageId), fact('Environment', r.environment),
          fact('Matched rules', (r.matched_rules || []).join(', ') || 'none')),
        calls));
    }
  });
}

// ---------- start ----------

async function boot() {
  document.getElementById('sign-in-form').addEventListener('submit', signIn);
  document.getElementById('sign-out').addEventListener('click', signOut);
  window.addEventListener('hashchange', route);
  const response = await fetch('/console/session', { credentials: 'same-origin', headers: { Accept: 'application/json' } });
  const session = response.ok ? await response.json() : {};
  if (session.signed_in) {
    state.csrf = session.csrf_token;
    await startConsole();
  } else {
    showSignIn('');
  }
}

document.addEventListener('DOMContentLoaded', boot);
