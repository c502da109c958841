// Toast notifications for the results of actions and for errors. The region
// is an aria-live log, so screen readers announce each one. It is a manual
// popover, and while a modal dialog is open (the order panel, the new-order
// form) it moves into that dialog before a toast is added, and is shown
// again: so it is drawn above the dialog, and is not inert as everything
// outside a modal dialog is; the toast can be read and dismissed there.

import { el } from './format.js';

const MAX_TOASTS = 5;
const SHOW_MS = { ok: 4000, info: 4000, error: 8000 };

let region;

export function initToasts(node) {
  region = node;
  // A dialog opened or closed: toasts on screen follow to the topmost one
  // (or back to the page), not left under a backdrop or in a closed dialog.
  new MutationObserver(() => {
    if (region.children.length) showRegion();
    else if (region.parentElement !== document.body) document.body.append(region);
  }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['open'] });
}

/** The open modal dialog last in the page (the sign-in comes last: it may open over the others). */
function topModal() {
  const open = [...document.querySelectorAll('dialog[open]')];
  try {
    return open.filter((d) => d.matches(':modal')).pop();
  } catch {
    return open.pop(); // a browser without :modal
  }
}

/**
 * The region in the topmost modal dialog (or the page), shown. Moved and
 * shown again only when its place changes (a move closes a popover), so a
 * second toast does not take the focus from the first one's button.
 */
function showRegion() {
  const host = topModal() || document.body;
  if (region.parentElement !== host) host.append(region);
  if (region.popover && !region.matches(':popover-open')) region.showPopover();
}

export function toast(message, kind = 'info') {
  if (!region) return;
  // The same words already on screen (a failure repeated by retries) are not said again.
  const same = [...region.children].some((n) => n.classList.contains(`toast-${kind}`) &&
    n.querySelector('.toast-text')?.textContent === message);
  if (same) return;
  const close = el('button', { class: 'toast-close', type: 'button', 'aria-label': 'Dismiss' }, '×');
  const node = el('div', { class: `toast toast-${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    el('span', { class: 'toast-text' }, message), close);
  const remove = () => {
    node.remove();
    if (!region.children.length && region.popover && region.matches(':popover-open')) region.hidePopover();
  };
  close.addEventListener('click', remove);
  showRegion();
  region.append(node);
  while (region.children.length > MAX_TOASTS) region.firstElementChild.remove();
  const shown = SHOW_MS[kind] || SHOW_MS.info;
  // Not taken away from under the keyboard focus: it waits for the focus to leave.
  const expire = () => (node.contains(document.activeElement) ? setTimeout(expire, shown / 4) : remove());
  setTimeout(expire, shown);
}

export const toastError = (prefix, e) => toast(`${prefix}: ${e.message}`, 'error');
