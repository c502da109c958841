// The create-order form. Validation is the server's: a 422 names the field
// (customer_name, customer_email, product, quantity, unit_price, or body for
// the request as a whole) and the message is shown under that input.

import { api } from './api.js';
import { randomOrder } from './random.js';
import { toast, toastError } from './toast.js';

const FIELDS = ['customer_name', 'customer_email', 'product', 'quantity', 'unit_price'];

/** Where an open form's values wait across a reload of the tab (signing in reloads the page). */
const DRAFT_KEY = 'ordercast.create-draft';

/** The form's values as the API expects them; numbers stay as typed when they are not numbers, so the server can say why. */
function values(form) {
  const v = Object.fromEntries(FIELDS.map((f) => [f, form.elements[f].value.trim()]));
  const order = { customer_name: v.customer_name, product: v.product };
  if (v.customer_email) order.customer_email = v.customer_email;
  order.quantity = /^-?\d+$/.test(v.quantity) ? Number(v.quantity) : v.quantity || null;
  order.unit_price = v.unit_price === '' ? null : v.unit_price;
  return order;
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
    dialog.querySelectorAll('[data-close]').forEach((b) => b.addEventListener('click', () => dialog.close()));
    dialog.querySelector('#create-random').addEventListener('click', () => this.fill(randomOrder(customer())));
    // An open form outlives a reload of its tab (signing in again after a
    // token expired reloads the page): kept for this tab only, and filled
    // in when the form is next opened. Not while its create is on its way
    // (it may be done: the form would invite a second one).
    window.addEventListener('pagehide', () => {
      if (!this.d.open || this.sending) return;
      const draft = Object.fromEntries(FIELDS.map((f) => [f, this.form.elements[f].value]));
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
      this.draft = null;
    }
    this.d.showModal();
    this.form.elements.customer_name.focus();
  }

  fill(order) {
    for (const f of FIELDS) this.form.elements[f].value = order[f] ?? '';
    this.clearErrors();
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
  }

  async submit() {
    this.clearErrors();
    const button = this.form.querySelector('[type=submit]');
    button.disabled = true;
    const opened = this.opened;
    const same = () => this.opened === opened && this.d.open;
    const sent = values(this.form);
    this.sending = true;
    try {
      const order = await api.createOrder(sent);
      toast(`Order #${order.id} created`, 'ok');
      // Cleared while it still holds what was sent (also when opened again
      // since, but not changed: one click would create it twice); closed
      // unless it was opened again meanwhile.
      if (JSON.stringify(values(this.form)) === JSON.stringify(sent)) this.form.reset();
      if (this.opened === opened && this.d.open) this.d.close();
    } catch (e) {
      const field = FIELDS.includes(e.field) ? e.field : 'body';
      // "quantity: must be between 1 and 1000000" under the quantity input needs no "quantity: ".
      const message = field === 'body' ? e.message : e.message.replace(new RegExp(`^${field}:\\s*`), '');
      if (e.status === 422 && same() && this.setError(field, message)) {
        this.form.elements[e.field]?.focus();
      } else if (e.code === 'timeout') {
        // The request may have been taken before the wait ran out: a second
        // click could create the order twice.
        toast('The server did not answer in time: the order may have been created. Look for it in the table before creating it again.', 'error');
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
