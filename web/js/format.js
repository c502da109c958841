// Formatting and the small DOM helper every view uses. Text always goes in
// through textContent, never innerHTML: order fields come from anyone who can
// write to the database.

export const STATUSES = ['pending', 'processing', 'processed', 'shipped', 'delivered', 'cancelled', 'failed'];

const money = new Intl.NumberFormat(undefined, { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const count = new Intl.NumberFormat();
// 24-hour times: narrower in a table, and unambiguous in a monitoring view.
const time = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });
const dateTime = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
});

export const fmtMoney = (n) => (n == null ? '—' : money.format(Number(n)));
export const fmtCount = (n) => (n == null ? '—' : count.format(n));

/** Time of day for today, date and time otherwise. */
export function fmtWhen(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  const now = new Date();
  return d.toDateString() === now.toDateString() ? time.format(d) : dateTime.format(d);
}

/** Date and time; a value that is no point in time (PostgreSQL's 'infinity', '-infinity') as it came. */
export function fmtFull(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : dateTime.format(d);
}

export const label = (status) => status.charAt(0).toUpperCase() + status.slice(1);

/**
 * el('td', {class: 'x', dataset: {id: 1}}, 'text', child) — children are
 * strings (set as text) or nodes.
 */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'text') node.textContent = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) {
    if (c == null || c === false) continue;
    node.append(typeof c === 'string' || typeof c === 'number' ? String(c) : c);
  }
  return node;
}

export function statusBadge(status) {
  return el('span', { class: `badge s-${status}` }, label(status));
}

/** "api:127.0.0.1" -> {kind: "api", who: "127.0.0.1"} */
export function splitActor(actor) {
  const i = (actor || '').indexOf(':');
  return i < 0 ? { kind: actor || '?', who: '' } : { kind: actor.slice(0, i), who: actor.slice(i + 1) };
}
