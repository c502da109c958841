// Signing in, for servers started with API keys or a JWT secret. The server
// keeps the token in the `ordercast_token` cookie (POST /api/session), which
// it sets HttpOnly: it goes with every request, WebSocket and EventSource of
// this origin, and no script on the page can read it, an injected one
// neither. GET /api/session says what the token may do, and the page offers
// only that. With authentication off (the default on loopback) none of this
// shows.

import { ApiError, request, setUnauthorizedHandler } from './api.js';
import { toast } from './toast.js';

/** The cookie's name: dashboards before /api/session kept it readable by scripts. */
const COOKIE = 'ordercast_token';

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
  }

  /**
   * Who the page's token is: {authentication, name, scopes, customer,
   * expires_at}, or null when the server cannot tell now (a 401 has then
   * opened the sign-in). Shows what the token may do: without `write`, the
   * page offers no changes.
   */
  async load() {
    await this.secureOlderCookie();
    let me;
    try {
      me = await request('GET', '/api/session');
    } catch {
      return null;
    }
    this.signOut.hidden = !me.authentication;
    document.documentElement.toggleAttribute('data-read-only', !me.scopes.includes('write'));
    return me;
  }

  /**
   * A token an older dashboard kept in a cookie scripts can read goes to
   * the server, which keeps it in its HttpOnly cookie in its place.
   */
  async secureOlderCookie() {
    const old = document.cookie.split(';').map((c) => c.trim()).find((c) => c.startsWith(`${COOKIE}=`));
    if (!old) return;
    try {
      await request('POST', '/api/session', { body: { token: old.slice(COOKIE.length + 1) } });
    } catch {
      // No longer valid (or authentication is off): forget it.
      document.cookie = `${COOKIE}=; Path=/; Max-Age=0; SameSite=Strict`;
    }
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
    if (!token) {
      this.error.textContent = 'Enter the token as issued.';
      return;
    }
    try {
      await request('POST', '/api/session', { body: { token } });
    } catch (e) {
      this.error.textContent = e instanceof ApiError && e.status === 401 ? `Not accepted: ${e.message}` : e.message;
      return;
    }
    location.reload();
  }
}
