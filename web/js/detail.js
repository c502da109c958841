// Order detail: every field, the status history as a timeline, the change
// messages that arrive while it is open, and the actions the order's status
// allows. It follows the order over its own stream (GET /api/orders/{id}/events:
// the current state, then its changes), so it stays live while open.

import { api } from './api.js';
import { describe } from './activity.js';
import { el, fmtCount, fmtFull, fmtMoney, fmtWhen, label, statusBadge, splitActor } from './format.js';
import { PING_INTERVAL_MS, SILENCE_LIMIT_MS, backoff } from './stream.js';
import { toast, toastError } from './toast.js';

const FIELDS = [
  ['id', 'Id', (v) => `#${v}`],
  ['external_id', 'External id'],
  ['customer_name', 'Customer'],
  ['customer_email', 'Email'],
  ['product', 'Product'],
  ['quantity', 'Quantity', fmtCount],
  ['unit_price', 'Unit price', fmtMoney],
  ['amount', 'Amount', fmtMoney],
  ['status', 'Status', statusBadge],
  ['error_message', 'Error'],
  ['version', 'Version'],
  ['created_at', 'Created', fmtFull],
  ['updated_at', 'Updated', fmtFull],
  ['processing_at', 'Processing since', fmtFull],
  ['processed_at', 'Processed', fmtFull],
  ['shipped_at', 'Shipped', fmtFull],
  ['delivered_at', 'Delivered', fmtFull],
  ['cancelled_at', 'Cancelled', fmtFull],
  ['failed_at', 'Failed', fmtFull],
];

const MAX_CHANGES = 50;

export class OrderDetail {
  /**
   * @param transitions () -> Promise of the state machine
   * @param signInDismissed () -> Promise resolved at once, or once an open sign-in is dismissed
   * @param onClosed () -> void, once the dialog has closed (and given the focus back)
   */
  constructor(dialog, { transitions, signInDismissed = () => Promise.resolve(), onClosed = () => {} }) {
    this.d = dialog;
    this.transitions = transitions;
    this.signInDismissed = signInDismissed;
    this.order = null;
    this.es = null;
    // Whether a failure to read the actions or the history has been said
    // (once until they can be read again, not at every retry or change).
    this.failureSaid = { actions: false, history: false };
    const $ = (id) => dialog.querySelector(`#${id}`);
    this.n = {
      title: $('detail-title'), gone: $('detail-gone'), fields: $('detail-fields'), history: $('detail-history'),
      changes: $('detail-changes'), actions: $('detail-actions'), statusForm: $('status-form'),
      statusSelect: $('status-select'), cancel: $('detail-cancel'), del: $('detail-delete'),
      confirm: $('delete-confirm'), yes: $('delete-yes'), no: $('delete-no'),
    };
    dialog.querySelectorAll('[data-close]').forEach((b) => b.addEventListener('click', () => dialog.close()));
    dialog.addEventListener('close', () => {
      this.stop();
      onClosed();
    });
    this.n.statusForm.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.changeStatus(this.n.statusSelect.value);
    });
    this.n.apply = this.n.statusForm.querySelector('button[type="submit"]');
    this.n.statusSelect.addEventListener('change', () => {
      this.n.apply.disabled = this.busy || !this.n.statusSelect.value;
    });
    this.n.cancel.addEventListener('click', () => this.act('cancel', () => api.cancelOrder(this.order.id, this.order.version)));
    this.n.del.addEventListener('click', () => this.askDelete(true));
    this.n.no.addEventListener('click', () => this.askDelete(false));
    this.n.yes.addEventListener('click', () => this.remove());
  }

  async open(id) {
    this.stop();
    this.id = id;
    this.order = null;
    this.deleted = false;
    this.offeredFor = undefined;
    this.failureSaid = { actions: false, history: false };
    this.n.statusSelect.replaceChildren();
    this.n.title.textContent = `Order #${id}`;
    this.n.gone.hidden = true;
    this.n.fields.replaceChildren();
    this.n.history.replaceChildren();
    this.n.changes.replaceChildren(el('li', { class: 'muted' }, 'None yet.'));
    this.askDelete(false);
    // No action until the order is known (offerActions shows them).
    this.n.statusForm.hidden = true;
    this.n.cancel.hidden = true;
    this.n.del.hidden = true;
    if (!this.d.open) this.d.showModal();
    // Closed (or another order opened) while the order was on its way: the
    // answer is for nobody, and nothing is followed for a closed dialog.
    const asked = this.following;
    const wanted = () => this.id === id && this.d.open && this.following === asked;
    try {
      const [order] = await Promise.all([api.getOrder(id), this.loadHistory()]);
      if (!wanted()) return;
      this.show(order);
    } catch (e) {
      if (!wanted()) return;
      toastError(`Order #${id}`, e);
      if (e.status === 404) this.markDeleted();
      return;
    }
    this.follow(id);
  }

  stop() {
    this.es?.close();
    this.es = null;
    clearInterval(this.watch);
    this.watch = null;
    clearTimeout(this.retry);
    this.retry = null;
    clearTimeout(this.offerRetry);
    this.offerRetry = null;
    clearTimeout(this.historyRetry);
    this.historyRetry = null;
    // A refollow still waiting for its answer belongs to what was stopped.
    this.following = (this.following ?? 0) + 1;
  }

  follow(id, attempt = 0) {
    const es = new EventSource(`/api/orders/${id}/events`);
    this.es = es;
    // The server sends at least a heartbeat every 15 s: a stream silent for
    // longer is dead on the way (a NAT that forgot it, a laptop that slept)
    // although EventSource still calls it open, and the order shown would
    // go stale without a word. It is read again and followed afresh.
    let lastHeard = Date.now();
    for (const type of ['open', 'heartbeat', 'ready', 'snapshot', 'change', 'position']) {
      es.addEventListener(type, () => {
        lastHeard = Date.now();
      });
    }
    clearInterval(this.watch);
    this.watch = setInterval(() => {
      if (this.es !== es || Date.now() - lastHeard <= SILENCE_LIMIT_MS) return;
      clearInterval(this.watch);
      this.watch = null;
      es.close();
      this.es = null;
      this.refollow(id, attempt + 1);
    }, PING_INTERVAL_MS);
    es.addEventListener('open', () => {
      attempt = 0;
    });
    // EventSource reconnects by itself (resuming with Last-Event-ID) after
    // a dropped connection, but gives up for good on a refusal: a 401 once
    // the token has expired, a 429, a 503 from a proxy with no server behind
    // it (ordercast's own 503s come to EventSource as a stream that says to
    // retry). Then the order is read again (a 401 there opens the sign-in, a
    // 404 means it is gone) and followed afresh, with growing pauses.
    es.addEventListener('error', () => {
      if (this.es !== es || es.readyState !== EventSource.CLOSED) return;
      this.es = null;
      this.retry = setTimeout(() => this.refollow(id, attempt + 1), backoff(attempt));
    });
    const parse = (ev) => {
      try {
        return JSON.parse(ev.data);
      } catch {
        return null;
      }
    };
    es.addEventListener('snapshot', (ev) => {
      const msg = parse(ev);
      if (this.es === es && msg?.orders?.[0]) this.show(msg.orders[0]);
    });
    es.addEventListener('change', (ev) => {
      const c = parse(ev);
      if (this.es === es && c) this.changed(c);
    });
    es.addEventListener('resync', () => {
      if (this.es === es && this.d.open) this.open(id);
    });
  }

  async refollow(id, attempt) {
    this.retry = null;
    if (this.id !== id || !this.d.open || this.deleted) return;
    const following = this.following;
    const current = () => this.following === following && this.id === id && this.d.open;
    let order;
    try {
      order = await api.getOrder(id);
    } catch (e) {
      if (!current()) return;
      if (e.status === 404) {
        this.markDeleted('This order has been deleted, or is no longer visible to you.');
        return;
      }
      // Refused for want of a token (the sign-in has opened): not asked
      // again with it while the sign-in is open.
      if (e.status === 401) await this.signInDismissed();
      if (!current()) return;
      this.retry = setTimeout(() => this.refollow(id, attempt + 1), backoff(attempt));
      return;
    }
    if (!current()) return;
    this.show(order);
    this.refreshHistory();
    this.follow(id, attempt);
  }

  changed(c) {
    const list = this.n.changes;
    if (list.firstElementChild?.classList.contains('muted')) list.replaceChildren();
    const { kind } = splitActor(c.actor);
    list.prepend(el('li', {},
      el('span', { class: 'muted mono' }, `seq ${c.seq}`), ' ',
      el('time', { datetime: c.at }, fmtWhen(c.at)), ' ',
      el('span', { class: `actor actor-${kind}` }, c.actor), ' ',
      el('span', {}, ...describe(c, { link: false }))));
    while (list.children.length > MAX_CHANGES) list.lastElementChild.remove();
    if (c.op === 'delete') {
      this.markDeleted();
      return;
    }
    if (c.op === 'leave') {
      // Moved to a customer this token may not see: what is shown is the
      // last state it could see.
      this.markDeleted('This order moved to another customer and is no longer visible to you.');
      return;
    }
    // An 'enter' carries no old row: the history is read again.
    const statusChanged = c.op === 'enter' || (c.old && c.old.status !== c.order.status);
    this.show(c.order);
    if (statusChanged) this.refreshHistory();
  }

  /**
   * Reads the history again after a change. One that cannot be read is
   * said, and asked for again, with growing pauses, while the dialog shows
   * the order (unless a newer read was asked for meanwhile).
   */
  refreshHistory(attempt = 0) {
    const id = this.id;
    clearTimeout(this.historyRetry);
    this.historyRetry = null;
    const loading = this.loadHistory();
    const asked = this.historyAsked;
    loading.then(() => {
      this.failureSaid.history = false;
    }, async (e) => {
      const current = () => this.id === id && this.d.open && !this.deleted && asked === this.historyAsked;
      if (!current()) return;
      if (e.status === 401) await this.signInDismissed();
      else this.sayFailure('history', `Could not load the history of order #${id}`, e);
      if (!current()) return;
      this.historyRetry = setTimeout(() => {
        if (current()) this.refreshHistory(attempt + 1);
      }, backoff(attempt));
    });
  }

  /** An error toast for what could not be read (`what`: 'actions' or 'history'), unless its failure was said already. */
  sayFailure(what, prefix, e) {
    if (this.failureSaid[what]) return;
    this.failureSaid[what] = true;
    toastError(prefix, e);
  }

  async loadHistory() {
    const id = this.id;
    // Reloads triggered by live changes can answer out of order: only the
    // latest one asked is shown.
    const asked = (this.historyAsked = (this.historyAsked ?? 0) + 1);
    const items = await api.history(id);
    if (this.id !== id || asked !== this.historyAsked) return;
    this.n.history.replaceChildren(...items.map((h) =>
      el('li', { class: 'tl-item' },
        el('span', { class: `tl-dot d-${h.to}`, 'aria-hidden': 'true' }),
        el('div', { class: 'tl-main' },
          h.from ? el('span', {}, statusBadge(h.from), ' → ', statusBadge(h.to)) : el('span', {}, 'Created as ', statusBadge(h.to)),
          el('div', { class: 'tl-meta' }, el('time', { datetime: h.at }, fmtFull(h.at)), ' · by ', el('span', { class: 'mono' }, h.by))))));
  }

  show(order) {
    // An answer that arrives after a newer version of the order did (the
    // PATCH's, while the stream already brought the processor's next step)
    // is not shown over it.
    if (this.order?.id === order.id && order.version < this.order.version) return;
    this.order = order;
    this.n.fields.replaceChildren(...FIELDS.flatMap(([key, name, fmt]) => {
      const v = order[key];
      const shown = v == null || v === '' ? el('span', { class: 'muted' }, '—') : fmt ? fmt(v) : String(v);
      return [el('dt', {}, name), el('dd', {}, shown)];
    }));
    this.offerActions();
  }

  /**
   * Shows the actions the order's status allows. The state machine comes
   * from /api/transitions; when it cannot be read, that is said, and it is
   * asked for again, with growing pauses, while the dialog is open.
   */
  async offerActions(attempt = 0) {
    const order = this.order;
    let machine;
    try {
      machine = await this.transitions();
    } catch (e) {
      const current = () => this.order === order && this.d.open && !this.deleted;
      if (!current()) return;
      if (e.status === 401) await this.signInDismissed();
      else this.sayFailure('actions', `Could not load the actions for order #${order.id}`, e);
      if (!current()) return;
      clearTimeout(this.offerRetry);
      this.offerRetry = setTimeout(() => {
        if (current()) this.offerActions(attempt + 1);
      }, backoff(attempt));
      return;
    }
    clearTimeout(this.offerRetry);
    this.offerRetry = null;
    this.failureSaid.actions = false;
    const next = machine[order.status] || [];
    if (this.order !== order) return;
    const focused = document.activeElement;
    const sel = this.n.statusSelect;
    const moves = next.filter((s) => s !== 'cancelled');
    // A change to the order (live, or this dialog's own) must not change
    // what the user chose: kept while the status is the same; when the
    // status moved, nothing is chosen (the choices are new) until they pick.
    const chosen = sel.value;
    const first = this.offeredFor === undefined;
    const moved = !first && this.offeredFor !== order.status;
    sel.replaceChildren(...moves.map((s) => el('option', { value: s }, label(s))));
    // (The browser selects the first option of a rebuilt list: undone
    // unless this is the order's first offer.)
    if (moved || (!first && !chosen)) sel.selectedIndex = -1;
    else if (moves.includes(chosen)) sel.value = chosen;
    this.offeredFor = order.status;
    this.n.apply.disabled = this.busy || !sel.value;
    this.n.statusForm.hidden = this.deleted || moves.length === 0;
    this.n.cancel.hidden = this.deleted || !next.includes('cancelled');
    this.n.del.hidden = this.deleted || !this.n.confirm.hidden;
    this.refocus(focused);
  }

  markDeleted(text = 'This order has been deleted.') {
    const focused = document.activeElement;
    this.deleted = true;
    this.stop();
    this.n.gone.textContent = text;
    this.n.gone.hidden = false;
    this.n.statusForm.hidden = true;
    this.n.cancel.hidden = true;
    this.n.del.hidden = true;
    this.n.confirm.hidden = true;
    this.refocus(focused);
  }

  askDelete(ask) {
    const focused = document.activeElement;
    this.n.confirm.hidden = !ask;
    this.n.del.hidden = ask || this.deleted;
    if (ask) this.n.no.focus();
    else if (this.n.confirm.contains(focused) && !this.n.del.hidden) this.n.del.focus();
    this.refocus(focused);
  }

  /**
   * The control focused before a change (`focused`) was just hidden
   * (Cancel after cancelling, the actions of an order deleted meanwhile):
   * the focus goes to the banner saying why, or the dialog's title, not
   * out of the dialog.
   */
  refocus(focused) {
    if (!this.d.open || !this.d.contains(focused)) return;
    const at = document.activeElement;
    if (this.d.contains(at) && at.offsetParent !== null) return;
    const to = this.n.gone.hidden ? this.n.title : this.n.gone;
    to.tabIndex = -1;
    to.focus();
  }

  /**
   * While an action is on its way, none is sent again (a second click would
   * send the version the first one replaces, and be refused after it
   * succeeded): Apply, Cancel order and Yes, delete wait for its answer.
   */
  setBusy(busy) {
    this.busy = busy;
    this.n.apply.disabled = busy || !this.n.statusSelect.value;
    this.n.cancel.disabled = busy;
    this.n.yes.disabled = busy;
  }

  /**
   * Once an action has its answer: the controls are enabled again, and the
   * keyboard focus, which a disabled button loses, goes back to the one it
   * was on (or, if that is gone, where `refocus` puts it).
   */
  settle(focused) {
    this.setBusy(false);
    if (this.d.open && this.d.contains(focused) && !this.d.contains(document.activeElement) &&
      focused.offsetParent !== null && !focused.disabled) focused.focus();
    this.refocus(focused);
  }

  async act(what, call) {
    if (!this.order || this.busy) return;
    const id = this.order.id;
    const focused = document.activeElement;
    this.setBusy(true);
    try {
      const order = await call();
      if (this.id === id && order) this.show(order);
      toast(what === 'cancel' ? `Order #${id} cancelled` : `Order #${id} is now ${label(order.status)}`, 'ok');
    } catch (e) {
      toastError(`Could not ${what === 'cancel' ? 'cancel' : 'update'} order #${id}`, e);
      if (e.status === 412) this.reread(id);
    } finally {
      this.settle(focused);
    }
  }

  /**
   * After a 412 (the order changed since it was shown): the order as it is
   * now, so the next try sends its version and the actions fit its status.
   */
  async reread(id) {
    try {
      const order = await api.getOrder(id);
      if (this.id === id && this.d.open && !this.deleted) this.show(order);
    } catch (e) {
      if (this.id === id && e.status === 404) this.markDeleted();
    }
  }

  changeStatus(status) {
    if (!status) return;
    return this.act('status', () => api.patchOrder(this.order.id, { status }, this.order.version));
  }

  async remove() {
    if (!this.order || this.busy) return;
    const { id, version } = this.order;
    const focused = document.activeElement;
    this.setBusy(true);
    try {
      await api.deleteOrder(id, version);
      toast(`Order #${id} deleted`, 'ok');
      this.setBusy(false);
      this.d.close();
    } catch (e) {
      toastError(`Could not delete order #${id}`, e);
      this.settle(focused);
      this.askDelete(false);
      if (e.status === 412) this.reread(id);
    }
  }
}
