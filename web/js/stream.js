// The live connection: every committed change, in order, exactly once.
//
// WebSocket first (`/ws?since=P`); when a WebSocket cannot be established
// while plain HTTP works (a proxy that blocks upgrades, say), Server-Sent
// Events (`/api/events?since=P`) instead. Either way the position of the last
// change handed on is kept, every reconnect resumes from it, and anything at
// or below it is dropped, so a reconnect neither loses nor doubles a change.
// When the server says the position is gone (`resync`), the owner reloads and
// hands back the position its reload reflects.

import { api, streamsServed } from './api.js';

/** First reconnect delay; doubled per failed attempt up to the maximum. */
const BACKOFF_START_MS = 1000;
const BACKOFF_MAX_MS = 10000;

/**
 * A connection that stayed up this long after `ready` worked: the reconnect
 * after it starts the backoff over. One cut sooner (a proxy that lets the
 * handshake through and then ends the connection) keeps backing off.
 */
const STABLE_MS = 10000;

/** The pause before attempt `attempt + 1` of a reconnect (0: the first). */
export const backoff = (attempt) => Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** attempt);
/**
 * A WebSocket client pings this often; a ping followed by nothing at all
 * (no answer, no message) by the next one means the connection is dead.
 */
export const PING_INTERVAL_MS = 15000;
/**
 * A WebSocket whose opening handshake is not answered within this long is
 * given up as one that failed (a proxy that holds upgrade requests without a
 * word, say): the browser itself may wait minutes.
 */
const OPEN_TIMEOUT_MS = 10000;
/** An SSE stream is dead when nothing at all (the server's heartbeats come every 15 s) arrives for this long. */
export const SILENCE_LIMIT_MS = 40000;
/**
 * After falling back to SSE, WebSocket is tried again this long after (a
 * refusal for now, such as a full server, also looks like a broken
 * WebSocket); doubled per failed try up to the maximum.
 */
const WEBSOCKET_RETRY_MS = 60000;
const WEBSOCKET_RETRY_MAX_MS = 30 * 60000;
/** Close codes of a WebSocket refused for want of a (sufficient) token. */
const CLOSE_UNAUTHORIZED = 4001;
const CLOSE_FORBIDDEN = 4003;
/** The reason of a 4003 that refuses the page's origin, not its token. */
const ORIGIN_REFUSED = 'origin not allowed';
const CLOSE_UNAVAILABLE = 4503;
const CLOSE_TRY_LATER = 1013;

export class Stream {
  /**
   * @param {object} handlers
   *   onChange(change)          one change message, in order, never twice
   *   onState({phase, transport, position, retryAt})
   *   onResync() -> Promise<position>  reload everything; resolve with the new position
   *   onUnauthorized() -> Promise  the server refused the stream for want of a (valid) token;
   *                             resolves once the sign-in is dismissed (signing in reloads the page)
   */
  constructor(handlers) {
    this.h = handlers;
    this.transport = 'websocket';
    this.position = 0;
    this.phase = 'connecting';
    this.retryAt = null;
    this.attempt = 0;
    this.readyAt = null;
    this.conn = null;
    this.timer = null;
    this.pinger = null;
    this.lastHeard = 0;
    this.upgrade = null;
    this.upgradeTries = 0;
  }

  start(position) {
    this.position = position;
    this.connect();
  }

  setPhase(phase, retryAt = null) {
    this.phase = phase;
    this.retryAt = retryAt;
    this.h.onState({ phase, transport: this.transport, position: this.position, retryAt });
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    if (this.phase !== 'reconnecting' && this.phase !== 'resyncing') this.setPhase('connecting');
    if (this.transport === 'websocket') this.openWebSocket();
    else this.openEventSource();
  }

  /** One message from either transport. */
  handle(msg) {
    this.lastHeard = Date.now();
    switch (msg.type) {
      case 'ready':
        this.readyAt = Date.now();
        if (this.transport === 'websocket') this.upgradeTries = 0;
        this.setPhase('connected');
        break;
      case 'change':
        if (msg.seq <= this.position) return; // already handed on before a reconnect
        this.position = msg.seq;
        this.h.onChange(msg);
        break;
      case 'position':
        // A filtered stream's resume position, past changes it skipped.
        if (msg.seq > this.position) this.position = msg.seq;
        break;
      case 'resync':
        this.resync(msg.seq);
        break;
      case 'shutdown':
        this.dropConnection();
        this.scheduleReconnect();
        break;
      default:
        break; // pong, and message types added later
    }
  }

  openWebSocket() {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const ws = new WebSocket(`${proto}//${location.host}/ws?since=${this.position}`);
    let ready = false;
    this.conn = { close: () => ws.close(1000) };
    const opening = setTimeout(() => {
      if (this.conn?.ws !== ws || ws.readyState !== WebSocket.CONNECTING) return;
      this.dropConnection();
      this.afterWebSocketFailure();
    }, OPEN_TIMEOUT_MS);
    ws.addEventListener('message', (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === 'ready') ready = true;
      this.handle(msg);
    });
    ws.addEventListener('open', () => {
      clearTimeout(opening);
      this.lastHeard = Date.now();
      // Judged by the answer to its own ping, not by how long the stream
      // has been quiet: a hidden tab's timers may run once a minute, and a
      // quiet stream brings nothing between two pings.
      let pingedAt = null;
      this.pinger = setInterval(() => {
        if (this.conn?.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
        if (pingedAt !== null && this.lastHeard < pingedAt) {
          // Dead on the way: the browser could wait a long time for the
          // close handshake; reconnect now.
          this.dropConnection();
          this.scheduleReconnect();
          return;
        }
        ws.send('{"type":"ping"}');
        pingedAt = Date.now();
      }, PING_INTERVAL_MS);
    });
    ws.addEventListener('close', (ev) => {
      clearTimeout(opening);
      if (this.conn?.ws !== ws) return; // replaced on purpose
      this.dropConnection();
      if (ev.code === CLOSE_FORBIDDEN && ev.reason === ORIGIN_REFUSED) {
        // Not a token's fault: the server takes this page's origin for
        // another site's (a proxy that rewrites Host, with no
        // ORDERCAST_ALLOWED_ORIGINS). SSE asks no origin of a same-site
        // page; a sign-in would change nothing.
        this.afterWebSocketFailure();
      } else if (ev.code === CLOSE_UNAUTHORIZED || ev.code === CLOSE_FORBIDDEN) {
        this.afterRefusal();
      } else if (ready || ev.code === CLOSE_UNAVAILABLE || ev.code === CLOSE_TRY_LATER) {
        // 4503 (the server could not open the stream for now) and 1013
        // (too many invalid tokens from this address, for now) mean
        // WebSocket itself works: try it again.
        this.scheduleReconnect();
      } else this.afterWebSocketFailure();
    });
    this.conn.ws = ws;
  }

  /**
   * A WebSocket that closed before `ready`: if the server serves streams
   * over plain HTTP, WebSocket is what is broken on the way, so switch to
   * SSE; if not, the server is down (or stopping) and the WebSocket is
   * retried with backoff.
   */
  async afterWebSocketFailure() {
    if (await streamsServed()) {
      this.transport = 'sse';
      this.connect();
      this.retryWebSocketLater();
    } else {
      this.scheduleReconnect();
    }
  }

  /** On SSE after a WebSocket failed: WebSocket is tried again after a while. */
  retryWebSocketLater() {
    clearTimeout(this.upgrade);
    const delay = Math.min(WEBSOCKET_RETRY_MAX_MS, WEBSOCKET_RETRY_MS * 2 ** this.upgradeTries);
    this.upgradeTries += 1;
    this.upgrade = setTimeout(() => {
      this.upgrade = null;
      if (this.transport !== 'sse') return;
      // The position resumes exactly on either transport: nothing is lost
      // or doubled by the switch. A stream reconnecting or resyncing picks
      // WebSocket at its next connect.
      this.transport = 'websocket';
      if (this.phase === 'connected') {
        this.dropConnection();
        this.connect();
      }
    }, delay);
  }

  openEventSource() {
    const es = new EventSource(`/api/events?since=${this.position}`);
    let ready = false;
    this.conn = { es, close: () => es.close() };
    es.addEventListener('ready', () => {
      ready = true;
    });
    // The server sends at least a heartbeat every 15 s: a stream silent for
    // longer is dead on the way (a NAT that forgot it, a laptop that slept)
    // although EventSource still calls it open.
    this.lastHeard = Date.now();
    this.pinger = setInterval(() => {
      if (this.conn?.es !== es || Date.now() - this.lastHeard <= SILENCE_LIMIT_MS) return;
      this.dropConnection();
      this.scheduleReconnect();
    }, PING_INTERVAL_MS);
    es.addEventListener('heartbeat', () => {
      this.lastHeard = Date.now();
    });
    for (const type of ['ready', 'change', 'position', 'resync', 'shutdown']) {
      es.addEventListener(type, (ev) => {
        this.lastHeard = Date.now();
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          return;
        }
        this.handle({ ...msg, type });
      });
    }
    // EventSource would reconnect by itself, but only with Last-Event-ID of
    // the last event it saw; reconnecting here keeps one backoff and one
    // position for both transports.
    //
    // `error` is both the server's own event (`token_expired`, or a refusal
    // for now such as `shutting_down`, after which it ends the stream) and
    // EventSource's report of a failed connection, whose status it does not
    // show: a stream refused before `ready` without a word asks the REST API,
    // whose 401 opens the sign-in (as WebSocket's 4001 does).
    es.addEventListener('error', (ev) => {
      if (this.conn?.es !== es) return;
      let code = null;
      try {
        code = ev.data ? JSON.parse(ev.data).code : null;
      } catch {
        code = null;
      }
      this.dropConnection();
      if (code === 'token_expired') {
        this.afterRefusal();
        return;
      }
      if (ready || code) {
        this.scheduleReconnect();
        return;
      }
      // Refused before `ready` without a word: a 401 from the REST API says
      // why (and opens the sign-in), and the stream waits as after 4001.
      this.setPhase('reconnecting');
      api.listOrders({ limit: 1 }).then(
        () => this.reconnectIfIdle(),
        (e) => (e.status === 401 ? this.afterRefusal() : this.reconnectIfIdle()),
      );
    });
  }

  /**
   * Refused for want of a (valid) token: the sign-in opens, and the stream
   * waits until it is dismissed (signing in reloads the page) instead of
   * asking again and again with a token it knows is refused.
   */
  async afterRefusal() {
    clearTimeout(this.timer);
    this.timer = null;
    this.setPhase('reconnecting');
    try {
      await this.h.onUnauthorized();
    } finally {
      this.reconnectIfIdle();
    }
  }

  /** Schedules a reconnect unless a connection or a reconnect is already under way. */
  reconnectIfIdle() {
    if (!this.conn && this.timer === null) this.scheduleReconnect();
  }

  dropConnection() {
    clearInterval(this.pinger);
    this.pinger = null;
    const c = this.conn;
    this.conn = null;
    c?.close();
  }

  scheduleReconnect() {
    clearTimeout(this.timer);
    if (this.readyAt !== null && Date.now() - this.readyAt >= STABLE_MS) this.attempt = 0;
    this.readyAt = null;
    const base = backoff(this.attempt);
    const delay = Math.round(base * (0.8 + Math.random() * 0.4));
    this.attempt += 1;
    this.setPhase('reconnecting', Date.now() + delay);
    this.timer = setTimeout(() => this.connect(), delay);
  }

  /**
   * @param head the server's position when it said so: the reload reflects
   *   at least that. It replaces this stream's position, which may be ahead
   *   of the server's (a database restored from a backup), so that the owner
   *   does not wait for changes up to a position the server may never reach.
   */
  async resync(head) {
    this.dropConnection();
    const before = this.position;
    this.position = Number.isSafeInteger(head) && head >= 0 ? head : 0;
    this.setPhase('resyncing');
    try {
      this.position = await this.h.onResync();
      this.connect();
    } catch {
      // Not reloaded: the reconnect asks from where the page still is, so
      // the server says resync again and the reload is tried again (from
      // `head` it would resume as if the page had been reloaded).
      this.position = before;
      this.scheduleReconnect();
    }
  }
}
