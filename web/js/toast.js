// Toast notifications for the results of actions and for errors. The region
// is an aria-live log, so screen readers announce each one.

import { el } from './format.js';

const MAX_TOASTS = 5;
const SHOW_MS = { ok: 4000, info: 4000, error: 8000 };

let region;

export function initToasts(node) {
  region = node;
}

export function toast(message, kind = 'info') {
  if (!region) return;
  const close = el('button', { class: 'toast-close', type: 'button', 'aria-label': 'Dismiss' }, '×');
  const node = el('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    el('span', { class: 'toast-text' }, message), close);
  const remove = () => node.remove();
  close.addEventListener('click', remove);
  region.append(node);
  while (region.children.length > MAX_TOASTS) region.firstElementChild.remove();
  setTimeout(remove, SHOW_MS[kind] || SHOW_MS.info);
}

export const toastError = (prefix, e) => toast(`${prefix}: ${e.message}`, 'error');
