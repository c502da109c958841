// Signing in, for servers started with API keys or a JWT secret. The token
// is kept in the `ordercast_token` cookie, which the server reads on every
// request, WebSocket and EventSource of this origin: nothing else in the
// dashboard needs to know about it. With authentication off (the default on
// loopback) none of this shows.

import { ApiError, request, setUnauthorizedHandler } from './api.js';

const COOKIE = 'ordercast_token';
/** Characters a cookie value can carry as is. */
const COOKIE_SAFE = /^[\x21\x23-\x2B\x2D-\x3A\x3C-\x5B\x5D-\x7E]+$/;

export const signedIn = () => document.cookie.split(';').some((c) => c.trim().startsWith(`${COOKIE}=`));

function setCookie(value, maxAge) {
  const secure = location.protocol === 'https:' ? '; Secure' : '';
  document.cookie = `${COOKIE}=${value}; Path=/; Max-Age=${maxAge}; SameSite=Strict${secure}`;
}

export class SignIn {
  constructor(dialog, signOutButton) {
    this.d = dialog;
    this.form = dialog.querySelector('form');
    this.input = dialog.querySelector('#f-token');
    this.error = dialog.querySelector('#e-token');
    this.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.submit();
    });
    signOutButton.hidden = !signedIn();
    signOutButton.addEventListener('click', () => {
      setCookie('', 0);
      location.reload();
    });
    setUnauthorizedHandler(() => this.open());
  }

  open() {
    if (this.d.open) return;
    this.error.textContent = '';
    this.d.showModal();
    this.input.focus();
  }

  async submit() {
    const token = this.input.value.trim();
    this.error.textContent = '';
    if (!COOKIE_SAFE.test(token)) {
      this.error.textContent = 'Enter the token as issued (no spaces, quotes, commas or semicolons).';
      return;
    }
    try {
      // What every token with the read scope may ask, also one confined to
      // a customer (which /api/stats refuses with 403).
      await request('GET', '/api/orders?limit=1', { headers: { Authorization: `Bearer ${token}` } });
    } catch (e) {
      this.error.textContent = e instanceof ApiError && e.status === 401 ? `Not accepted: ${e.message}` : e.message;
      return;
    }
    setCookie(token, 30 * 24 * 3600);
    location.reload();
  }
}
