// The create-order form. Validation is the server's: a 422 names the field
// (customer_name, customer_email, product, quantity, unit_price, or body for
// the request as a whole) and the message is shown under that input.
//
// Each draft is sent with an external id of its own (unless the user gave
// one), kept while the same draft is tried again: a create whose answer was
// lost on the way (the connection dropped, a proxy gave up waiting) may
// have been done, and sending it again then gets a 409 for that id instead
// of making the order a second time.

import { api } from './api.js';
import { randomOrder } from './random.js';
import { toast, toastError } from './toast.js';

const FIELDS = ['customer_name', 'customer_email', 'product', 'quantity', 'unit_price'];

/** Where an open form's values wait across a reload of the tab (signing in reloads the page). */
const DRAFT_KEY = 'ordercast.create-draft';

/** A number as JSON writes it (leading zeros allowed): "2", "2.0", "1e3", "-1". */
const NUMBER = /^-?\d+(\.\d+)?([eE][+-]?\d+)?$/;

/**
 * The form's values as the API expects them. The quantity goes as a JSON
 * number when it is written as one ("2.0" and "1e3" are whole numbers to the
 * server); anything else stays as typed, so the server can say why. The unit
 * price goes as the text typed, which the server reads exactly (as a number
 * it would be the double it reads as).
 */
function values(form) {
  const v = Object.fromEntries(FIELDS.map((f) => [f, form.elements[f].value.trim()]));
  const order = { customer_name: v.customer_name, product: v.product };
  if (v.customer_email) order.customer_email = v.customer_email;
  const quantity = NUMBER.test(v.quantity) ? Number(v.quantity) : NaN;
  order.quantity = Number.isFinite(quantity) ? quantity : v.quantity || null;
  order.unit_price = v.unit_price === '' ? null : v.unit_price;
  return order;
}

/** A random, unguessable external id for a draft (crypto.randomUUID needs HTTPS or localhost). */
function newExternalId() {
  if (crypto.randomUUID) return `dashboard-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `dashboard-${[...bytes].map((b) => b.toString(16).padStart(2, '0')).join('')}`;
}

/**
 * A failure after which the order may exist: no answer (the connection
 * dropped, or the wait ran out), or a proxy's 502 or 504 (it lost the
 * server, or gave up waiting for it, after passing the request on).
 */
const mayHaveCreated = (e) => e.status === 0 || e.status === 502 || e.status === 504;

/** Whether `order` is what the form sent as `sent` (an earlier try of the same draft). */
function madeFrom(order, sent) {
  return order.customer_name === sent.customer_name && order.product === sent.product &&
    Number(order.quantity) === Number(sent.quantity) && Number(order.unit_price) === Number(sent.unit_price) &&
    (order.customer_email ?? '') === (sent.customer_email ?? '');
}

/** The order whose external id is `externalId`, or null (not found, or the search failed). */
async function findByExternalId(externalId) {
  try {
    const page = await api.listOrders({ q: externalId, limit: 5 });
    return page.items.find((o) => o.external_id === externalId) ?? null;
  } catch {
    return null;
  }
}

export class CreateForm {
  /** @param customer () => the customer a confined token may create orders for, or null */
  constructor(dialog, customer = () => null) {
    this.d = dialog;
    this.form = dialog.querySelector('form');
    this.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.submit();
    });
    this.form.addEventListener('input', (ev) => {
      if (ev.target.name) this.setError(ev.target.name, '');
    });
    // A form emptied is a new draft: it gets an external id of its own.
    this.form.addEventListener('reset', () => this.newDraft());
    this.announcer = dialog.querySelector('#create-announce');
    dialog.querySelectorAll('[data-close]').forEach((b) => b.addEventListener('click', () => dialog.close()));
    dialog.querySelector('#create-random').addEventListener('click', () => this.fill(randomOrder(customer())));
    // An open form outlives a reload of its tab (signing in again after a
    // token expired reloads the page): kept for this tab only, and filled
    // in when the form is next opened. Not while its create is on its way
    // (it may be done: the form would invite a second one).
    window.addEventListener('pagehide', () => {
      if (!this.d.open || this.sending) return;
      const draft = Object.fromEntries(FIELDS.map((f) => [f, this.form.elements[f].value]));
      // Its external id goes with it: a create that may have been done
      // before the reload is not done twice by the same draft.
      if (this.externalId) {
        draft.dashboardExternalId = this.externalId;
        draft.dashboardFirstSent = this.firstSent;
      }
      try {
        sessionStorage.setItem(DRAFT_KEY, JSON.stringify(draft));
      } catch {
        // Storage refused (full, or off): the form is lost as before.
      }
    });
    // A page taken back from the browser's cache still has its form: the
    // draft saved when it was left is not for a later reload.
    window.addEventListener('pageshow', (ev) => {
      if (ev.persisted) this.takeDraft();
    });
    this.draft = this.takeDraft();
  }

  /** The draft a reload of this tab left, taken out of storage. */
  takeDraft() {
    try {
      const draft = JSON.parse(sessionStorage.getItem(DRAFT_KEY) ?? 'null');
      sessionStorage.removeItem(DRAFT_KEY);
      return draft && typeof draft === 'object' ? draft : null;
    } catch {
      return null;
    }
  }

  open() {
    // A create still on its way answers for the form as it was sent: it
    // neither clears nor closes the form reopened since (see `submit`).
    this.opened = (this.opened ?? 0) + 1;
    this.clearErrors();
    if (this.draft) {
      this.fill(this.draft);
      if (typeof this.draft.dashboardExternalId === 'string') {
        this.externalId = this.draft.dashboardExternalId;
        this.firstSent = this.draft.dashboardFirstSent ?? null;
      }
      this.draft = null;
    }
    this.d.showModal();
    this.form.elements.customer_name.focus();
  }

  /** Fills the form with another order: a new draft. */
  fill(order) {
    for (const f of FIELDS) this.form.elements[f].value = order[f] ?? '';
    this.newDraft();
    this.clearErrors();
  }

  /**
   * The form holds a new draft: the next create gets an external id of its
   * own. `firstSent`: what the draft's first try sent (JSON), which a 409 for
   * its id is told apart by when the order cannot be read back.
   */
  newDraft() {
    this.externalId = null;
    this.firstSent = null;
  }

  setError(field, message) {
    const p = this.d.querySelector(`#e-${field}`);
    if (!p) return false;
    p.textContent = message;
    const input = this.form.elements[field];
    if (input) {
      if (message) input.setAttribute('aria-invalid', 'true');
      else input.removeAttribute('aria-invalid');
    }
    return true;
  }

  clearErrors() {
    for (const f of [...FIELDS, 'body']) this.setError(f, '');
    if (this.announcer) this.announcer.textContent = '';
  }

  /**
   * Leads to the field a 422 names. Focus moved to it reads its error (the
   * input is described by it); a field that has the focus already (Enter
   * pressed in it) is not read again, so the error is said through the
   * form's live region instead.
   */
  showFieldError(field, message) {
    const input = this.form.elements[field];
    if (!input) return;
    if (document.activeElement === input) {
      if (this.announcer) this.announcer.textContent = message;
    } else {
      input.focus();
    }
  }

  /** The external id this draft is sent with: the user's, if the form has a field for it, or the draft's own. */
  externalIdFor() {
    const typed = this.form.elements.external_id?.value.trim();
    if (typed) return { externalId: typed, own: false };
    this.externalId ??= newExternalId();
    return { externalId: this.externalId, own: true };
  }

  async submit() {
    this.clearErrors();
    const button = this.form.querySelector('[type=submit]');
    button.disabled = true;
    const opened = this.opened;
    const same = () => this.opened === opened && this.d.open;
    const sent = values(this.form);
    const { externalId, own } = this.externalIdFor();
    if (own) this.firstSent ??= JSON.stringify(sent);
    const firstSent = own ? this.firstSent : null;
    // Cleared while it still holds what was sent (also when opened again
    // since, but not changed: one click would create it twice); closed
    // unless it was opened again meanwhile. The next draft gets a new id.
    const done = () => {
      if (this.externalId === externalId) this.newDraft();
      if (JSON.stringify(values(this.form)) === JSON.stringify(sent)) this.form.reset();
      if (same()) this.d.close();
    };
    this.sending = true;
    try {
      const order = await api.createOrder({ ...sent, external_id: externalId });
      toast(`Order #${order.id} created`, 'ok');
      done();
    } catch (e) {
      const field = FIELDS.includes(e.field) ? e.field : 'body';
      // "quantity: must be between 1 and 1000000" under the quantity input needs no "quantity: ".
      const message = field === 'body' ? e.message : e.message.replace(new RegExp(`^${field}:\\s*`), '');
      if (e.status === 422 && same() && this.setError(field, message)) {
        this.showFieldError(field, message);
      } else if (e.code === 'duplicate_external_id' && own) {
        // Only this draft has its id: an earlier try created the order,
        // and its answer was lost.
        // Told apart from the earlier try by the order read back, or, when
        // it cannot be read (a token without the read scope, the search
        // failed), by what that try sent.
        const order = await findByExternalId(externalId);
        if (order ? madeFrom(order, sent) : firstSent === JSON.stringify(sent)) {
          toast(order ? `Order #${order.id} was already created by the earlier try` : 'The order was already created by the earlier try', 'ok');
          done();
        } else {
          // Changed since: what the form holds now is another order, which
          // the next click creates (with an id of its own).
          if (this.externalId === externalId) this.newDraft();
          toast(`${order ? `Order #${order.id}` : 'An order'} was already created by an earlier try, with the values the form had then. ` +
            'Click Create order again to create this one as well.', 'info');
        }
      } else if (mayHaveCreated(e)) {
        // The request may have been taken before the answer was lost.
        // Sent again, this draft carries the same external id: the order
        // cannot be created twice.
        const why = e.code === 'timeout' ? 'The server did not answer in time'
          : e.status === 0 ? 'The connection was lost before the server answered'
            : `A proxy answered ${e.status} for the server`;
        toast(`${why}: the order may have been created. Creating it again from this form will not make a second one.`, 'error');
      } else {
        toastError('Could not create the order', e);
      }
    } finally {
      this.sending = false;
      button.disabled = false;
    }
  }
}

/** The "Random order" button: one plausible order, created at once (for `customer` if given). */
export async function createRandomOrder(customer = null) {
  try {
    const order = await api.createOrder(randomOrder(customer));
    toast(`Order #${order.id} created for ${order.customer_name}`, 'ok');
  } catch (e) {
    toastError('Could not create a random order', e);
  }
}
