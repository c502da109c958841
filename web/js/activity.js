// The activity feed: every change as it happens, whoever made it (the API,
// the Kafka ingest, or someone in psql). Entries are queued and drawn a few
// times a second at most; only the newest ones are kept in the DOM. At
// start-up it is filled with the changes before the page's position (GET
// /api/changes), drawn below whatever came live meanwhile.

import { el, fmtMoney, fmtWhen, label, splitActor } from './format.js';
import { FrameThrottle } from './frame.js';

const KEEP = 60;
/** A feed redrawn more often than this cannot be read anyway. */
const RENDER_GAP_MS = 250;

/** The fields an update changed, besides the bookkeeping ones. */
function changedFields(order, old) {
  if (!old) return [];
  const skip = new Set(['version', 'updated_at', 'status', 'amount',
    'processing_at', 'processed_at', 'shipped_at', 'delivered_at', 'cancelled_at', 'failed_at']);
  return Object.keys(order).filter((k) => !skip.has(k) && JSON.stringify(order[k]) !== JSON.stringify(old[k]));
}

/** One sentence for a change, as a list of text and badge nodes. */
export function describe(change, { link = true } = {}) {
  const o = change.order;
  const old = change.old;
  const ref = (id) => (link ? el('button', { class: 'link', type: 'button', dataset: { open: id } }, `#${id}`) : `#${id}`);
  if (change.op === 'insert') {
    return [`created `, ref(o.id), ` · ${o.customer_name} · ${o.quantity} × ${o.product} · ${fmtMoney(o.amount)}`];
  }
  if (change.op === 'delete') return ['deleted ', ref(o.id), ` · ${o.customer_name}`];
  // A token confined to one customer sees an order moved to another customer
  // leave its view (no link: it can no longer be opened), and one moved from
  // another customer enter it.
  if (change.op === 'leave') return [`moved away #${o.id} · ${o.customer_name}`];
  if (change.op === 'enter') {
    return ['moved in ', ref(o.id), ` · ${o.customer_name} · ${o.quantity} × ${o.product} · ${fmtMoney(o.amount)}`];
  }
  const parts = ['updated ', ref(o.id)];
  if (old && old.status !== o.status) {
    parts.push(' ', el('span', { class: `badge s-${old.status}` }, label(old.status)), ' → ',
      el('span', { class: `badge s-${o.status}` }, label(o.status)));
  }
  const fields = changedFields(o, old);
  if (fields.length) parts.push(` · ${fields.join(', ')}`);
  return parts;
}

export class ActivityFeed {
  constructor(list, { onOpen }) {
    this.list = list;
    this.queue = [];
    this.painter = new FrameThrottle(() => this.render(), RENDER_GAP_MS);
    list.addEventListener('click', (ev) => {
      const b = ev.target.closest('[data-open]');
      if (b) onOpen(Number(b.dataset.open));
    });
  }

  push(change) {
    this.queue.push(change);
    if (this.queue.length > KEEP) this.queue.splice(0, this.queue.length - KEEP);
    this.painter.schedule();
  }

  render() {
    const items = this.queue.splice(0).reverse().map((c) => this.entry(c));
    this.list.prepend(...items);
    while (this.list.children.length > KEEP) this.list.lastElementChild.remove();
  }

  /**
   * Adds earlier changes (newest first, all before any live one) below the
   * entries there are, up to the feed's size.
   */
  backfill(changes) {
    const room = KEEP - this.list.children.length - this.queue.length;
    if (room <= 0) return;
    this.list.append(...changes.slice(0, room).map((c) => {
      const li = this.entry(c);
      li.classList.add('act-earlier');
      return li;
    }));
  }

  entry(change) {
    const { kind, who } = splitActor(change.actor);
    return el('li', { class: `act act-${change.op}` },
      el('time', { datetime: change.at, class: 'act-time' }, fmtWhen(change.at)),
      el('span', { class: `actor actor-${kind}`, title: change.actor }, kind, who ? el('span', { class: 'actor-who' }, ` ${who}`) : null),
      el('span', { class: 'act-text' }, ...describe(change)));
  }
}
