// The live order table: one page of orders, newest first, kept current by the
// change stream.
//
// A page is loaded over REST together with the change-log position it
// reflects. Changes at or below that position are already in it; changes
// after it are applied on top, including the ones that arrived while the page
// was loading (replayed from the recent-changes buffer). The DOM holds one
// page of rows at most and is redrawn in an animation frame at most every
// RENDER_GAP_MS however many changes arrive.

import { api } from './api.js';
import { el, fmtCount, fmtMoney, fmtWhen, statusBadge } from './format.js';
import { FrameThrottle } from './frame.js';

export const PAGE_SIZE = 50;
/** Under a stream of changes the table is redrawn at most this often. */
const RENDER_GAP_MS = 100;
/** A page that lost rows is reloaded after this delay, so a burst of departures costs one request. */
const REFILL_DELAY_MS = 800;
/** How long rows stay put after the pointer last moved over them. */
const HOLD_MS = 1500;

/** Mirrors the server's search: customer, product, external id or email contain q (case-insensitive), or id = q. */
export function matches(order, filter) {
  if (filter.status && order.status !== filter.status) return false;
  const q = filter.q;
  if (!q) return true;
  const digits = q.replace(/^#+/, '');
  if (/^\d+$/.test(digits) && Number(digits) === order.id) return true;
  const needle = q.toLowerCase();
  return [order.customer_name, order.product, order.external_id, order.customer_email].some(
    (f) => f != null && String(f).toLowerCase().includes(needle),
  );
}

export class OrderTable {
  /**
   * @param {object} opts
   *   tbody, empty, summary, newer, buttons {newest, newer, older}
   *   status: a live region, told what a page the user asked for holds
   *   recent: () => changes received so far that may be newer than a page (oldest first)
   *   recentFrom: () => the position after which `recent` holds every change the stream delivered
   *   holdRecent: () => keeps `recent` filled while a page loads; returns the function that ends that
   *   streamPosition: () => the position the stream has reached
   *   onOpen(id): open an order
   *   onError(message)
   */
  constructor(opts) {
    this.o = opts;
    this.filter = { status: null, q: '' };
    this.rows = [];
    this.position = 0;
    this.cursors = []; // cursor of each page before the current one; [] = newest page
    this.cursor = null; // ids below this are on this page (null: newest page)
    this.hasMore = false;
    this.newerCount = 0;
    this.loading = 0; // id of the load in flight, to ignore stale answers
    this.retrying = 0; // pages the user asked for, being asked for again
    this.asked = 0; // pages the user asked for, counted: a newer one ends the retries of an older
    this.pages = 0; // pages loaded, counted
    this.failure = null; // why the last page could not load: an ApiError, or null (no consistent page)
    this.loaded = false;
    this.trs = new Map(); // order id -> <tr>
    this.dirty = new Set(); // ids whose row must be redrawn
    this.flash = new Set(); // ids to highlight at the next render
    this.painter = new FrameThrottle(() => this.draw(), RENDER_GAP_MS);
    this.flip = false;
    this.refill = null;
    opts.tbody.addEventListener('click', (ev) => {
      const tr = ev.target.closest('tr[data-id]');
      if (tr) this.o.onOpen(Number(tr.dataset.id));
    });
    // While the pointer moves over the rows, and for HOLD_MS after, they
    // stay where they are (changed cells are still redrawn): a row the user
    // aims at does not slide away under a stream of new orders. A pointer
    // that rests there (a dialog closed over the table) holds nothing.
    this.holdUntil = 0;
    opts.tbody.addEventListener('pointermove', () => {
      this.holdUntil = performance.now() + HOLD_MS;
      clearTimeout(this.holdTimer);
      this.holdTimer = setTimeout(() => this.schedule(), HOLD_MS + 20);
    });
    opts.tbody.addEventListener('pointerleave', () => {
      this.holdUntil = 0;
      this.schedule();
    });
    opts.buttons.newest.addEventListener('click', () => this.goNewest());
    opts.buttons.newer.addEventListener('click', () => this.goNewer());
    opts.buttons.older.addEventListener('click', () => this.goOlder());
    opts.newer.addEventListener('click', () => this.goNewest());
  }

  get onNewest() {
    return this.cursor == null;
  }

  /** A page the user asked for is on its way, or being asked for again: Older and Newer wait. */
  get busy() {
    return this.paging || this.retrying > 0;
  }

  /** Changes the filter: rows already shown are filtered at once, then the page is reloaded from the server. */
  setFilter(filter) {
    this.holdUntil = 0; // the user asked for other rows: no holding the old ones
    this.filter = { ...this.filter, ...filter };
    this.rows = this.rows.filter((o) => matches(o, this.filter));
    this.cursors = [];
    this.cursor = null;
    this.newerCount = 0;
    this.render();
    return this.loadAsked();
  }

  goNewest() {
    this.holdUntil = 0;
    this.cursors = [];
    this.cursor = null;
    this.newerCount = 0;
    return this.loadAsked();
  }

  goOlder() {
    // Not while a page is on its way: its rows are not the ones shown yet.
    if (!this.rows.length || !this.hasMore || this.busy) return undefined;
    this.holdUntil = 0;
    this.cursors.push(this.cursor);
    this.cursor = this.rows[this.rows.length - 1].id;
    return this.loadAsked();
  }

  goNewer() {
    if (this.onNewest || this.busy) return undefined;
    this.holdUntil = 0;
    this.cursor = this.cursors.pop() ?? null;
    if (this.onNewest) this.newerCount = 0;
    return this.loadAsked();
  }

  /**
   * Loads the page the user asked for (another tab, search, page) until it
   * comes, or the user asks for another: the filter and cursor are already
   * the new ones, so a page that did not come would leave the old rows
   * under them (a tab's rows under another tab, page 3's rows as page 1).
   * Tried again with backoff (`o.waitToRetry`), saying so once, while the
   * failure is one that passes (the server or the network away, a 5xx, a
   * 429, a 401 once the sign-in is dismissed); a refusal of the request
   * itself (a 4xx) is said and not repeated. A page loaded meanwhile by a
   * refill or a resync (of the same filter and cursor) ends it too.
   * Meanwhile Older and Newer wait (`retrying`).
   */
  async loadAsked() {
    const asked = ++this.asked;
    this.retrying += 1;
    try {
      for (let delay = 1000, tries = 0; ; delay = Math.min(delay * 2, 10000), tries++) {
        const pages = this.pages;
        if (await this.load({ announce: true, quiet: tries > 0 })) return true;
        const passes = [0, 401, 408, 429].includes(this.failure?.status ?? 0) || this.failure?.status >= 500;
        if (asked !== this.asked || !passes) return false;
        await this.o.waitToRetry(delay);
        if (asked !== this.asked) return false;
        if (this.pages !== pages) return true; // loaded meanwhile
      }
    } finally {
      this.retrying -= 1;
      this.summary();
    }
  }

  /**
   * Loads the current page and brings it up to the stream's position. False
   * when it could not. A load overtaken by a newer one (another tab, a new
   * search) answers with the newer one's outcome, so whoever waits for it
   * finds the page and its position set.
   */
  load({ announce = false, quiet = false } = {}) {
    const loading = this.loadPage(announce, quiet);
    this.latest = loading;
    return loading;
  }

  /**
   * @param announce say what the page holds (a page the user asked for, or the first)
   * @param quiet say nothing of a failure (one said already)
   */
  async loadPage(announce, quiet) {
    const first = !this.loaded;
    // Only a page the user asked for holds Older and Newer back (a refill
    // or a reload after a resync does not).
    if (announce) this.paging = true;
    try {
      return await this.fetchPage(announce || first, quiet);
    } finally {
      if (announce) {
        this.paging = false;
        this.summary();
      }
    }
  }

  async fetchPage(announce, quiet) {
    const release = this.o.holdRecent();
    try {
      return await this.fetchConsistentPage(announce, quiet);
    } finally {
      release();
    }
  }

  async fetchConsistentPage(announce, quiet) {
    const token = ++this.loading;
    for (let tries = 0; tries < 3; tries++) {
      let page;
      try {
        page = await api.listOrders({
          status: this.filter.status,
          q: this.filter.q,
          limit: PAGE_SIZE,
          cursor: this.cursor,
        });
      } catch (e) {
        if (token !== this.loading) return this.latest;
        this.failure = e;
        // A 401 opens the sign-in dialog; no need to say it twice.
        if (e.status !== 401 && !quiet) this.o.onError(`Could not load orders: ${e.message}`);
        return false;
      }
      if (token !== this.loading) return this.latest;
      const recent = this.o.recent();
      // Can every change after the page's position still be replayed? The
      // buffer holds every change the stream delivered after recentFrom
      // (positions between them need not be changes this stream gets).
      const streamAhead = this.o.streamPosition() > page.position;
      if (streamAhead && page.position < this.o.recentFrom()) continue;
      this.rows = page.items;
      this.position = page.position;
      this.hasMore = page.next_cursor != null;
      this.trs.forEach((_, id) => this.dirty.add(id));
      for (const c of recent) if (c.seq > this.position) this.apply(c, false);
      this.position = Math.max(this.position, this.o.streamPosition());
      this.loaded = true;
      this.pages += 1;
      this.paging = false;
      this.render();
      if (announce) this.announce();
      return true;
    }
    this.failure = { status: 503 }; // passes: the changes come slower later
    if (!quiet) this.o.onError('Could not load a consistent page of orders: too many changes at once; try again');
    return false;
  }

  /** A change from the stream. */
  applyChange(change) {
    if (!this.loaded || change.seq <= this.position) return;
    this.position = change.seq;
    this.apply(change, true);
  }

  apply(change, highlight) {
    const order = change.order;
    const i = this.rows.findIndex((o) => o.id === order.id);
    // 'leave': the order moved to a customer this token may not see (its
    // row is the last state it could); it goes like a delete. 'enter': it
    // came into view, like an insert or update.
    const keep = change.op !== 'delete' && change.op !== 'leave' && matches(order, this.filter);
    if (i >= 0) {
      if (keep) {
        this.rows[i] = order;
        this.dirty.add(order.id);
        if (highlight) this.flash.add(order.id);
      } else {
        this.forget(this.rows.splice(i, 1));
        if (this.hasMore) this.refillSoon();
      }
      this.schedule();
      return;
    }
    if (!keep) return;
    const upper = this.cursor; // ids below it belong on this page
    const full = this.rows.length >= PAGE_SIZE;
    const lower = full || this.hasMore ? this.rows[this.rows.length - 1]?.id ?? 0 : 0;
    if (upper != null && order.id >= upper) {
      if (change.op === 'insert' || change.op === 'enter') this.newerCount += 1;
      this.schedule();
      return;
    }
    if (order.id <= lower) {
      // It belongs on a later page; a full last page now has one.
      if (!this.hasMore) {
        this.hasMore = true;
        this.schedule();
      }
      return;
    }
    let at = this.rows.findIndex((o) => o.id < order.id);
    if (at < 0) at = this.rows.length;
    this.rows.splice(at, 0, order);
    // A row back on the page before the next render still has its old cells.
    if (this.trs.has(order.id)) this.dirty.add(order.id);
    if (highlight) this.flash.add(order.id);
    if (this.rows.length > PAGE_SIZE) {
      this.forget(this.rows.splice(PAGE_SIZE));
      this.hasMore = true;
    }
    this.schedule();
  }

  /**
   * Rows that left the page need no redraw or highlight. (Renders wait for an
   * animation frame, which a hidden tab never gets: without this, every order
   * inserted meanwhile would stay in these sets.)
   */
  forget(orders) {
    for (const o of orders) {
      this.dirty.delete(o.id);
      this.flash.delete(o.id);
    }
  }

  /** Rows left the page (their status moved out of the tab): fetch the page again, at most once per interval. */
  refillSoon() {
    if (this.refill) return;
    this.refill = setTimeout(() => {
      this.refill = null;
      this.load();
    }, REFILL_DELAY_MS);
  }

  schedule() {
    this.painter.schedule();
  }

  render() {
    this.painter.now();
  }

  get holding() {
    return performance.now() < this.holdUntil;
  }

  draw() {
    const { tbody } = this.o;
    if (this.holding && this.trs.size) {
      // Rows stay put: only the cells of the rows shown are redrawn; the
      // rest waits for the pointer to leave or rest.
      for (const order of this.rows) {
        const tr = this.trs.get(order.id);
        if (tr && this.dirty.has(order.id)) {
          this.fill(tr, order);
          this.dirty.delete(order.id);
        }
      }
      this.summary(this.rows.length !== this.trs.size || this.rows.some((o) => !this.trs.has(o.id)));
      return;
    }
    const wanted = new Set(this.rows.map((o) => o.id));
    // A row that goes with the keyboard focus in it (its order changed
    // status on a status tab, or was pushed off the page) hands the focus
    // to the row that takes its place: left to itself, it would fall to
    // the top of the document, and a keyboard or screen-reader user would
    // lose their place.
    const focused = document.activeElement?.closest?.('#orders-body tr');
    const focusAt = focused && !wanted.has(Number(focused.dataset.id)) ? [...tbody.children].indexOf(focused) : -1;
    for (const [id, tr] of this.trs) {
      if (!wanted.has(id)) {
        tr.remove();
        this.trs.delete(id);
      }
    }
    // Rows keep their relative order (ids never change), so new rows are
    // slotted in and nothing that stays is moved: moving would restart the
    // highlight animation.
    let next = tbody.firstElementChild;
    this.flip = !this.flip;
    for (const order of this.rows) {
      let tr = this.trs.get(order.id);
      if (!tr) {
        tr = this.row(order);
        this.trs.set(order.id, tr);
        tbody.insertBefore(tr, next);
      } else {
        if (this.dirty.has(order.id)) this.fill(tr, order);
        if (tr === next) next = next.nextElementSibling;
        else tbody.insertBefore(tr, next);
      }
      if (this.flash.has(order.id)) {
        // Two identical animations under different names: switching between
        // them restarts the highlight without forcing a layout.
        tr.classList.remove('flash-a', 'flash-b');
        tr.classList.add(this.flip ? 'flash-a' : 'flash-b');
      }
    }
    this.dirty.clear();
    this.flash.clear();
    this.summary();
    if (focusAt >= 0) this.focusRowAt(focusAt);
  }

  /** Focuses the button of the row at `index` (the last one if fewer), or the table when it has none. */
  focusRowAt(index) {
    const rows = this.o.tbody.children;
    const button = rows[Math.min(index, rows.length - 1)]?.querySelector('button');
    if (button) {
      button.focus();
      return;
    }
    const table = this.o.tbody.closest('table');
    table.tabIndex = -1;
    table.focus();
  }

  /** After a dialog closed over the table: the focus, if it fell to the document (its row is gone), goes to the table's first row. */
  catchFocus() {
    if (document.activeElement === document.body || !document.activeElement) this.focusRowAt(0);
  }

  row(order) {
    const tr = el('tr', { dataset: { id: order.id } });
    for (const cls of ['c-id', 'c-created', 'c-customer', 'c-product', 'c-qty num', 'c-amount num', 'c-status', 'c-updated']) {
      tr.append(el('td', { class: cls }));
    }
    // Made once: a row's order never changes id, and a button replaced at
    // every change would take the keyboard focus with it.
    tr.firstElementChild.append(
      el('button', { class: 'link', type: 'button', 'aria-label': `Open order ${order.id}` }, `#${order.id}`));
    this.fill(tr, order);
    return tr;
  }

  fill(tr, o) {
    const [, created, customer, product, qty, amount, status, updated] = tr.children;
    tr.dataset.status = o.status;
    created.textContent = fmtWhen(o.created_at);
    customer.replaceChildren(el('span', { class: 'customer' }, o.customer_name));
    if (o.customer_email) customer.append(el('span', { class: 'email' }, o.customer_email));
    customer.append(el('span', { class: 'product-sm' }, o.product));
    product.textContent = o.product;
    qty.textContent = fmtCount(o.quantity);
    amount.textContent = fmtMoney(o.amount);
    status.replaceChildren(statusBadge(o.status));
    updated.textContent = fmtWhen(o.updated_at);
  }

  /** @param waiting rows are held back (see `holding`) */
  summary(waiting = false) {
    const { summary, empty, newer, buttons } = this.o;
    const n = this.rows.length;
    empty.hidden = !this.loaded || n > 0;
    let text = this.describe();
    if (waiting) text += ' · new rows wait while the pointer moves over the table';
    // Written only when it changes: at every draw it would be a new text
    // node each time, which assistive technology may read out again.
    if (summary.textContent !== text) summary.textContent = text;
    newer.hidden = this.onNewest || this.newerCount === 0;
    newer.textContent = `${fmtCount(this.newerCount)} newer order${this.newerCount === 1 ? '' : 's'} · show newest`;
    buttons.newest.disabled = this.onNewest;
    buttons.newer.disabled = this.onNewest || this.busy;
    buttons.older.disabled = !this.hasMore || n === 0 || this.busy;
  }

  describe() {
    const n = this.rows.length;
    const page = this.cursors.length + 1;
    return n
      ? `Page ${page} · ${n} order${n === 1 ? '' : 's'} · #${this.rows[0].id} to #${this.rows[n - 1].id}`
      : `Page ${page}`;
  }

  /**
   * Says what a loaded page holds, once: screen readers hear the outcome of
   * a page, tab or search the user asked for, not every live change to the
   * rows (the summary beside the pager, which follows them, is not live).
   */
  announce() {
    const { status } = this.o;
    if (!status) return;
    const text = this.rows.length ? this.describe() : `Page ${this.cursors.length + 1} · no orders match`;
    // The same words again (the same page reloaded) are still said.
    status.textContent = status.textContent === text ? `${text}\u00a0` : text;
  }
}
