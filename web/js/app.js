// The dashboard: wires the live stream to the views.
//
// Start-up: load the first page of orders (which says the change-log position
// it reflects), then open the stream from that position. Every change goes to
// the table, the activity feed and the statistics, and, while a page is
// loading (a new filter, another page), into a buffer from which that page
// is brought up to date.

import { api } from './api.js';
import { ActivityFeed } from './activity.js';
import { SignIn } from './auth.js';
import { CreateForm, createRandomOrder } from './create.js';
import { OrderDetail } from './detail.js';
import { STATUSES, el, fmtCount, label } from './format.js';
import { Stats } from './stats.js';
import { Stream } from './stream.js';
import { OrderTable } from './table.js';
import { initToasts, toast } from './toast.js';

/** Changes kept for bringing a page that is loading up to date (40 s at 500 changes/s). */
const RECENT_MAX = 20000;
const SEARCH_DELAY_MS = 250;

const $ = (id) => document.getElementById(id);
initToasts($('toasts'));
const signIn = new SignIn($('signin'), $('sign-out'));

// Every change the stream delivered after `recentFrom`, oldest first. (Not
// every position: a filtered or confined stream skips the others'.) Kept
// only while a page is loading: a page reflects a position at or past the
// one the stream had reached when it was asked for, so the changes that
// arrive from then on are all it can need; between loads nothing is kept.
let recent = [];
let recentFrom = 0;
let loadsUnderway = 0;
const remember = (change) => {
  if (!loadsUnderway) return;
  recent.push(change);
  if (recent.length > RECENT_MAX * 1.5) {
    recentFrom = recent[recent.length - RECENT_MAX - 1].seq;
    recent = recent.slice(-RECENT_MAX);
  }
};
/** A page begins to load: changes are kept from here; the function returned says it is done. */
const holdRecent = () => {
  if (loadsUnderway++ === 0) {
    recent = [];
    recentFrom = stream.position;
  }
  let held = true;
  return () => {
    if (!held) return;
    held = false;
    if (--loadsUnderway === 0) recent = [];
  };
};

let transitions = null;
const getTransitions = () => (transitions ??= api.transitions().catch((e) => {
  transitions = null;
  throw e;
}));

/**
 * Waits `delay` before a page that could not load is asked for again, and
 * not while the sign-in is open (refused for want of a token: signing in
 * reloads the page).
 */
async function waitToRetry(delay) {
  await signIn.dismissed();
  await new Promise((r) => setTimeout(r, delay));
}

const detail = new OrderDetail($('detail'), {
  transitions: getTransitions,
  signInDismissed: () => signIn.dismissed(),
  // The table is made below; a dialog closes only once it is there.
  onClosed: () => table.catchFocus(),
});
const openOrder = (id) => detail.open(id);

const table = new OrderTable({
  tbody: $('orders-body'),
  empty: $('orders-empty'),
  summary: $('orders-summary'),
  status: $('orders-status'),
  newer: $('newer-notice'),
  buttons: { newest: $('page-newest'), newer: $('page-newer'), older: $('page-older') },
  recent: () => recent,
  recentFrom: () => recentFrom,
  holdRecent,
  streamPosition: () => stream.position,
  onOpen: openOrder,
  onError: (m) => toast(m, 'error'),
  waitToRetry,
});

const activity = new ActivityFeed($('activity-list'), { onOpen: openOrder });

// --- status tabs --------------------------------------------------------------
const tabs = [null, ...STATUSES].map((status) => {
  const count = el('span', { class: 'tab-count' });
  const tab = el('button', {
    class: `tab ${status ? `tab-${status}` : 'tab-all'}`, type: 'button', role: 'tab', id: `tab-${status || 'all'}`,
    'aria-selected': status ? 'false' : 'true', 'aria-controls': 'orders-panel', tabindex: status ? '-1' : '0',
    dataset: { status: status || '' },
  }, el('span', {}, status ? label(status) : 'All'), count);
  tab.count = count;
  return tab;
});
$('status-tabs').append(...tabs);

function selectTab(tab, focus) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute('aria-selected', String(on));
    t.tabIndex = on ? 0 : -1;
  }
  if (focus) tab.focus();
  table.setFilter({ status: tab.dataset.status || null });
}

$('status-tabs').addEventListener('click', (ev) => {
  const tab = ev.target.closest('[role=tab]');
  if (tab) selectTab(tab, false);
});
$('status-tabs').addEventListener('keydown', (ev) => {
  const i = tabs.indexOf(document.activeElement);
  if (i < 0) return;
  const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[ev.key];
  if (to == null) return;
  ev.preventDefault();
  selectTab(tabs[(to + tabs.length) % tabs.length], true);
});

function showCounts(total, byStatus) {
  for (const t of tabs) {
    const n = t.dataset.status ? byStatus[t.dataset.status]?.count : total;
    t.count.textContent = n == null ? '' : fmtCount(n);
  }
}

// --- search -------------------------------------------------------------------
let searchTimer = null;
const search = $('search');
const applySearch = () => {
  clearTimeout(searchTimer);
  if (search.value.trim() !== table.filter.q) table.setFilter({ q: search.value.trim() });
};
search.addEventListener('input', () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(applySearch, SEARCH_DELAY_MS);
});
$('search-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  applySearch();
});
document.addEventListener('keydown', (ev) => {
  if (ev.key === '/' && !ev.target.closest('input, textarea, select, dialog')) {
    ev.preventDefault();
    search.focus();
  }
});

// --- statistics ----------------------------------------------------------------
const stats = new Stats({
  orders: $('kpi-orders'), amount: $('kpi-amount'), rate: $('kpi-rate'), changes: $('kpi-changes'),
  products: $('products-body'), productsMore: $('products-more'), productNames: $('product-names'),
  chart: $('chart'), chartNote: $('chart-note'),
  dlqSection: $('dlq-section'), dlq: $('dlq-body'), dlqEmpty: $('dlq-empty'),
}, { onCounts: showCounts, onError: (m) => toast(m, 'error') });

// --- connection ------------------------------------------------------------------
const PHASE_TEXT = { connecting: 'Connecting…', connected: 'Live', reconnecting: 'Reconnecting…', resyncing: 'Resyncing…' };
let connection = { phase: 'connecting', transport: 'websocket', retryAt: null };

function showConnection() {
  const { phase, transport, retryAt } = connection;
  $('connection').dataset.phase = phase;
  let text = PHASE_TEXT[phase];
  if (phase === 'reconnecting' && retryAt) {
    const s = Math.ceil((retryAt - Date.now()) / 1000);
    if (s > 0) text = `Reconnecting in ${s} s…`;
  }
  if ($('connection-text').textContent !== text) $('connection-text').textContent = text;
  // Screen readers hear the phase when it changes, not the countdown or the
  // position, which change every second while changes flow.
  const said = PHASE_TEXT[phase].replace('…', '');
  if ($('connection-status').textContent !== said) $('connection-status').textContent = said;
  const detailText = `${transport === 'sse' ? 'SSE' : 'WebSocket'} · position ${fmtCount(stream.position)}`;
  if ($('connection-detail').textContent !== detailText) $('connection-detail').textContent = detailText;
}

const stream = new Stream({
  onChange(change) {
    remember(change);
    table.applyChange(change);
    activity.push(change);
    stats.change(change);
  },
  onState(state) {
    const was = connection.phase;
    connection = state;
    showConnection();
    if (state.phase === 'connected' && (was === 'reconnecting' || was === 'resyncing')) {
      toast(`Reconnected over ${state.transport === 'sse' ? 'SSE' : 'WebSocket'}; resumed at position ${fmtCount(state.position)}`, 'ok');
    }
  },
  onUnauthorized() {
    return signIn.open();
  },
  async onResync() {
    recent = [];
    recentFrom = stream.position;
    if (!(await table.load())) throw new Error('reload failed');
    stats.resync();
    toast('The stream had a gap: the orders were reloaded', 'info');
    return table.position;
  },
});
setInterval(showConnection, 500);

// --- dialogs and actions ----------------------------------------------------------------
// A token confined to one customer creates that customer's orders only,
// named as the token names it (the match is case-blind).
const confinedTo = () => signIn.me?.customer_name ?? signIn.me?.customer ?? null;
const create = new CreateForm($('create'), confinedTo);
$('new-order').addEventListener('click', () => create.open());
$('random-order').addEventListener('click', () => createRandomOrder(confinedTo()));

// --- theme ------------------------------------------------------------------------------
const darkQuery = matchMedia('(prefers-color-scheme: dark)');
const effectiveTheme = () => document.documentElement.dataset.theme || (darkQuery.matches ? 'dark' : 'light');
function showThemeButton() {
  const other = effectiveTheme() === 'dark' ? 'light' : 'dark';
  $('theme-toggle').setAttribute('aria-label', `Switch to ${other} theme`);
  $('theme-toggle').title = `Switch to ${other} theme`;
}
$('theme-toggle').addEventListener('click', () => {
  const next = effectiveTheme() === 'dark' ? 'light' : 'dark';
  document.documentElement.dataset.theme = next;
  try {
    localStorage.setItem('ordercast-theme', next);
  } catch {
    // Not saved; the choice still holds for this page.
  }
  showThemeButton();
  stats.rebuildChart();
});
darkQuery.addEventListener('change', () => {
  showThemeButton();
  stats.rebuildChart();
});
showThemeButton();

// --- start ------------------------------------------------------------------------------
async function start() {
  // What the token may do (a 401 opens the sign-in); meanwhile, and if
  // unknown, everything shows and the server refuses what it must.
  signIn.load();
  stats.refresh();
  for (let delay = 1000; !(await table.load()); delay = Math.min(delay * 2, 10000)) await waitToRetry(delay);
  recentFrom = table.position;
  stream.start(table.position);
  // The chart's backfill reads up to a few thousand orders: after the table.
  stats.start();
  // What happened before the page's position: the activity feed's start.
  // Without it (an older server, an error) the feed shows live changes only.
  try {
    const earlier = await api.recentChanges({ before: table.position + 1, limit: 60 });
    activity.backfill(earlier.changes);
  } catch {
    // Live changes only.
  }
}
start();
