// Signing in, for servers started with API keys or a JWT secret. The server
// keeps the token in a cookie (POST /api/session) it sets HttpOnly: it goes
// with every request, WebSocket and EventSource of this origin, and no
// script on the page can read it, an injected one neither. GET /api/session
// says what the token may do, and the page offers only that. With
// authentication off (the default on loopback) none of this shows.

import { ApiError, request, setUnauthorizedHandler } from './api.js';
import { toast } from './toast.js';

/**
 * A token cookie scripts can read was set by an older dashboard (the server
 * sets it HttpOnly): it goes, and the user signs in once more. Over HTTPS
 * the server no longer takes it anyway.
 */
function forgetReadableCookie() {
  if (!document.cookie.split(';').some((c) => c.trim().startsWith('ordercast_token='))) return;
  const secure = location.protocol === 'https:' ? '; Secure' : '';
  document.cookie = `ordercast_token=; Path=/; Max-Age=0; SameSite=Strict${secure}`;
}

export class SignIn {
  constructor(dialog, signOutButton) {
    this.d = dialog;
    this.form = dialog.querySelector('form');
    this.input = dialog.querySelector('#f-token');
    this.error = dialog.querySelector('#e-token');
    this.signOut = signOutButton;
    this.form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      this.submit();
    });
    signOutButton.addEventListener('click', async () => {
      try {
        await request('DELETE', '/api/session');
      } catch (e) {
        toast(`Not signed out: ${e.message}`, 'error');
        return;
      }
      location.reload();
    });
    setUnauthorizedHandler(() => this.open());
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') this.load();
    });
  }

  /**
   * Who the page's token is: {authentication, name, scopes, customer,
   * customer_name, expires_at}, or null when the server cannot tell (a 401 has then opened
   * the sign-in). Shows what the token may do: without `write`, the page
   * offers no changes. Asked again when the tab comes back into view
   * (another tab may have signed in or out), and until the server answers.
   */
  load() {
    this.loading ??= this.ask().finally(() => {
      this.loading = null;
    });
    return this.loading;
  }

  async ask() {
    clearTimeout(this.retry);
    forgetReadableCookie();
    const me = await this.who();
    if (me === null) {
      this.retry = setTimeout(() => this.load(), 5000);
      return null;
    }
    const before = this.me;
    this.me = me ?? false;
    if (!me) return null; // the 401 opened the sign-in
    if (!me.scopes.includes('read')) {
      this.me = false;
      this.open('This token lacks the read scope, which the dashboard needs to show orders.');
      return null;
    }
    // Signed in meanwhile, in another tab (also while the sign-in is open
    // here, after a stream was refused): start afresh, as after signing in here.
    if (before === false || this.d.open) {
      location.reload();
      return me;
    }
    this.signOut.hidden = !me.authentication;
    document.documentElement.toggleAttribute('data-read-only', !me.scopes.includes('write'));
    return me;
  }

  /** The session; undefined: no valid token (401); null: no answer. */
  async who() {
    try {
      return await request('GET', '/api/session');
    } catch (e) {
      return e instanceof ApiError && e.status === 401 ? undefined : null;
    }
  }

  /**
   * Opens the sign-in (once); resolves when it closes. Signing in reloads
   * the page; it closes otherwise only when the user dismisses it.
   */
  open(why = '') {
    if (!this.d.open) {
      this.error.textContent = why;
      this.d.showModal();
      this.input.focus();
      this.closed = new Promise((resolve) => this.d.addEventListener('close', () => resolve(), { once: true }));
    }
    return this.closed;
  }

  /** Resolves at once, or, while the sign-in is open, once it is dismissed. */
  dismissed() {
    return this.d.open ? this.closed : Promise.resolve();
  }

  async submit() {
    const token = this.input.value.trim();
    this.error.textContent = '';
    if (!token) {
      this.error.textContent = 'Enter the token as issued.';
      return;
    }
    try {
      // Kept only if it may read: without, the page could not show an order.
      await request('POST', '/api/session', { body: { token, scope: 'read' } });
    } catch (e) {
      const refused = e instanceof ApiError && (e.status === 401 || e.status === 403);
      this.error.textContent = refused ? `Not accepted: ${e.message}` : e.message;
      return;
    }
    location.reload();
  }
}
