// Toast notifications for the results of actions and for errors. The region
// is an aria-live log, so screen readers announce each one. It is a manual
// popover, shown again with every toast, so it is drawn above a modal dialog
// opened since (the order panel, the new-order form); and while one is open
// it moves into that dialog, as everything outside a modal dialog is inert:
// the toast can be read and dismissed there, not only seen.

import { el } from './format.js';

const MAX_TOASTS = 5;
const SHOW_MS = { ok: 4000, info: 4000, error: 8000 };

let region;

export function initToasts(node) {
  region = node;
  // Back to the page when the dialog it moved into closes (`close` does not
  // bubble: caught on the way down).
  document.addEventListener('close', (ev) => {
    if (region.parentElement !== ev.target) return;
    document.body.append(region);
    if (region.children.length) showRegion();
  }, true);
}

/** The region in the topmost modal dialog (or the page), above everything. */
function showRegion() {
  const modal = [...document.querySelectorAll('dialog[open]')].filter((d) => d.matches(':modal')).pop();
  const host = modal || document.body;
  if (region.parentElement !== host) host.append(region);
  if (!region.popover) return;
  if (region.matches(':popover-open')) region.hidePopover();
  region.showPopover();
}

export function toast(message, kind = 'info') {
  if (!region) return;
  const close = el('button', { class: 'toast-close', type: 'button', 'aria-label': 'Dismiss' }, '×');
  const node = el('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    el('span', { class: 'toast-text' }, message), close);
  const remove = () => {
    node.remove();
    if (!region.children.length && region.popover && region.matches(':popover-open')) region.hidePopover();
  };
  close.addEventListener('click', remove);
  region.append(node);
  while (region.children.length > MAX_TOASTS) region.firstElementChild.remove();
  showRegion();
  setTimeout(remove, SHOW_MS[kind] || SHOW_MS.info);
}

export const toastError = (prefix, e) => toast(`${prefix}: ${e.message}`, 'error');
