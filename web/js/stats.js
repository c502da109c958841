// Statistics: totals and per-status counts and the per-product table come
// from GET /api/stats (re-read at most every STATS_INTERVAL_MS while changes
// arrive); orders per minute are counted from the orders' created_at, first
// from the newest orders over REST, then from live inserts; dead letters come
// from GET /api/dlq while the server offers it.

import { api } from './api.js';
import { serverNow } from './clock.js';
import { el, fmtCount, fmtMoney, fmtWhen } from './format.js';

const STATS_INTERVAL_MS = 1500;
const DLQ_INTERVAL_MS = 15000;
const DLQ_LIMIT = 20;
const MINUTES = 60;
/** Backfill of the per-minute chart: at most this many pages of 500 newest orders. */
const BACKFILL_PAGES = 6;
const BACKFILL_PAGE = 500;
const PRODUCTS_SHOWN = 12;

const minuteOf = (ms) => Math.floor(ms / 60000);
const hourMinute = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', hourCycle: 'h23' });

/** Inserts kept while the backfill has not said its position: the newest (older ones are in its pages). */
const EARLY_MAX = 5000;

/** Orders created per minute, and how far back the counts are complete. */
class PerMinute {
  constructor() {
    this.buckets = new Map(); // minute number -> orders created in it
    this.completeFrom = null; // first minute whose count is complete; null: not known yet
    this.position = null; // inserts at or below this were counted by the backfill
    this.early = []; // inserts that arrived before the backfill knew its position
  }

  add(createdAt) {
    const m = minuteOf(Date.parse(createdAt));
    this.buckets.set(m, (this.buckets.get(m) || 0) + 1);
  }

  insert(change) {
    if (this.position == null) {
      // An insert the backfill's first page will hold is counted from it:
      // only the last ones can be newer than that page.
      this.early.push(change);
      if (this.early.length > EARLY_MAX * 1.5) this.early = this.early.slice(-EARLY_MAX);
    } else if (change.seq > this.position) this.add(change.order.created_at);
    // Minutes that left the chart are forgotten.
    if (this.buckets.size > MINUTES * 2) {
      const oldest = minuteOf(serverNow()) - MINUTES;
      for (const m of this.buckets.keys()) if (m < oldest) this.buckets.delete(m);
    }
  }

  /** Counts the newest orders, back an hour or as far as BACKFILL_PAGES go; throws if the first page fails. */
  async backfill() {
    const oldest = minuteOf(serverNow()) - MINUTES;
    let cursor = null;
    let complete = false;
    let last = null;
    try {
      for (let i = 0; i < BACKFILL_PAGES; i++) {
        const page = await api.listOrders({ limit: BACKFILL_PAGE, cursor });
        if (this.position == null) {
          this.position = page.position;
          for (const c of this.early.splice(0)) this.insert(c);
        }
        for (const o of page.items) this.add(o.created_at);
        last = page.items[page.items.length - 1];
        if (page.next_cursor == null) {
          complete = true;
          break;
        }
        if (last && minuteOf(Date.parse(last.created_at)) < oldest) {
          complete = true;
          break;
        }
        cursor = page.next_cursor;
      }
    } finally {
      // As far back as the pages read went: the minute of the last order
      // read may have more orders further back.
      if (this.position != null) {
        this.completeFrom = complete || !last ? -Infinity : minuteOf(Date.parse(last.created_at)) + 1;
      }
    }
  }

  series() {
    const now = minuteOf(serverNow());
    const xs = [];
    const ys = [];
    for (let m = now - MINUTES + 1; m <= now; m++) {
      xs.push(m * 60);
      ys.push(this.completeFrom == null || m < this.completeFrom ? null : this.buckets.get(m) || 0);
    }
    return [xs, ys];
  }

  /** Orders created in the last 60 s, and whether that count is complete. */
  lastMinute() {
    const now = serverNow();
    const m = minuteOf(now);
    const frac = (now % 60000) / 60000;
    // This minute so far plus the matching share of the previous one.
    const n = (this.buckets.get(m) || 0) + Math.round((this.buckets.get(m - 1) || 0) * (1 - frac));
    return { n, complete: this.completeFrom != null && this.completeFrom <= m - 1 };
  }
}

export class Stats {
  constructor(nodes, { onCounts, onError }) {
    this.n = nodes;
    this.onCounts = onCounts;
    this.onError = onError;
    this.timer = null;
    this.last = 0;
    this.perMinute = new PerMinute();
    this.perSecond = new Map(); // second number -> changes received in it
    this.chart = null;
    this.dlqTimer = null;
    this.forbidden = false; // the token may not read /api/stats (confined to one customer)
    this.reading = null; // the request for the totals under way
    this.again = false; // another refresh was asked for meanwhile
    this.lastError = null; // the error last said, until an answer comes
    this.backfills = 0; // the backfill under way (a newer one replaces it)
  }

  /** Dead letters, the chart's backfill and the once-a-second figures (the totals are read by refresh()). */
  start() {
    this.pollDeadLetters();
    this.backfill();
    setInterval(() => this.tick(), 1000);
  }

  /**
   * Counts the recent orders per minute from the server, until it answers
   * (a failure is said once; the chart shows what is known meanwhile).
   */
  async backfill() {
    const run = ++this.backfills;
    // An older run still waiting for a page writes to its own counts, which
    // a resync has replaced: nothing is counted twice.
    const counts = this.perMinute;
    for (let delay = 2000, said = false; run === this.backfills; delay = Math.min(delay * 2, 30000)) {
      try {
        await counts.backfill();
        break;
      } catch (e) {
        if (run !== this.backfills) return;
        if (counts.position != null) break; // later pages: counted as far as they went
        if (!said && e.status !== 401) this.onError(`Could not load recent orders for the chart: ${e.message}`);
        said = true;
        await new Promise((r) => setTimeout(r, delay));
      }
    }
    if (run === this.backfills) this.drawChart();
  }

  /** The stream had a gap: the per-minute counts are read again. */
  resync() {
    this.perMinute = new PerMinute();
    this.backfill();
    this.refresh();
  }

  /** A change arrived: count it and re-read the totals soon. */
  change(change) {
    const now = Date.now();
    const second = Math.floor(now / 1000);
    this.perSecond.set(second, (this.perSecond.get(second) || 0) + 1);
    // Only creations count as new orders: an order moved in from another
    // customer ('enter') was created before, and one moved away ('leave')
    // still exists; both are one change each, counted once above.
    if (change.op === 'insert') this.perMinute.insert(change);
    if (this.timer || this.forbidden) return;
    const wait = Math.max(0, this.last + STATS_INTERVAL_MS - now);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.refresh();
    }, wait);
  }

  /**
   * Reads the totals. One request at a time: a refresh asked for while one
   * is under way runs after it (answers cannot then come back out of order,
   * and a server slower than the polls is not asked ever more often).
   */
  refresh() {
    if (this.reading) {
      this.again = true;
      return this.reading;
    }
    this.reading = this.read().finally(() => {
      this.reading = null;
      if (this.again) {
        this.again = false;
        this.refresh();
      }
    });
    return this.reading;
  }

  async read() {
    this.last = Date.now();
    let s;
    try {
      s = await api.stats();
    } catch (e) {
      // A token confined to one customer may not read the totals (they
      // cover every customer): the figures stay empty, without an error
      // at every change. Another error is said once, not at every poll.
      if (e.status === 403) this.forbidden = true;
      else if (e.status !== 0 && e.status !== 401) {
        const said = `Could not load statistics: ${e.message}`;
        if (said !== this.lastError) this.onError(said);
        this.lastError = said;
      }
      return null;
    }
    this.lastError = null;
    this.n.orders.textContent = fmtCount(s.total_orders);
    this.n.amount.textContent = fmtMoney(s.total_amount);
    this.onCounts(s.total_orders, s.by_status);
    const rows = s.products.slice(0, PRODUCTS_SHOWN).map((p) =>
      el('tr', {}, el('td', {}, p.product), el('td', { class: 'num' }, fmtCount(p.count)),
        el('td', { class: 'num' }, fmtMoney(p.avg_price))));
    this.n.products.replaceChildren(...rows);
    if (!rows.length) {
      this.n.products.append(el('tr', {}, el('td', { colspan: 3, class: 'muted' }, 'No orders yet.')));
    }
    // The server lists the most ordered products, and counts them all.
    const more = (s.product_count ?? s.products.length) - PRODUCTS_SHOWN;
    this.n.productsMore.hidden = more <= 0;
    this.n.productsMore.textContent = `and ${fmtCount(more)} more product${more === 1 ? '' : 's'}`;
    this.n.productNames.replaceChildren(...s.products.slice(0, 50).map((p) => el('option', { value: p.product })));
    return s.position;
  }

  /** Once a second: the rate figures and the chart. */
  tick() {
    // Changes per second: the average over the last five whole seconds.
    const second = Math.floor(Date.now() / 1000);
    let changes = 0;
    for (const [s, n] of this.perSecond) {
      if (s < second - 5) this.perSecond.delete(s);
      else if (s < second) changes += n;
    }
    this.n.changes.textContent = fmtCount(Math.round(changes / 5));
    const { n, complete } = this.perMinute.lastMinute();
    this.n.rate.textContent = complete ? fmtCount(n) : `≥ ${fmtCount(n)}`;
    this.drawChart();
  }

  drawChart() {
    const data = this.perMinute.series();
    const known = data[1].filter((v) => v != null).length;
    this.n.chartNote.textContent = known === data[1].length
      ? 'last 60 minutes'
      : `last 60 minutes · counted for the last ${known} min`;
    if (typeof globalThis.uPlot !== 'function') return;
    if (this.chart) {
      this.chart.setData(data);
      return;
    }
    this.chart = this.makeChart(data);
    new ResizeObserver(() => {
      const w = this.n.chart.clientWidth;
      if (w && this.chart && w !== this.chart.width) this.chart.setSize({ width: w, height: this.chart.height });
    }).observe(this.n.chart);
  }

  /** The theme changed: colours are read when the chart is built. */
  rebuildChart() {
    if (!this.chart) return;
    this.chart.destroy();
    this.chart = this.makeChart(this.perMinute.series());
  }

  makeChart(data) {
    // The colour variables hold light-dark() pairs; a probe element resolves
    // them to the colour in force, which the canvas needs.
    const probe = document.createElement('span');
    this.n.chart.append(probe);
    const v = (name) => {
      probe.style.color = `var(${name})`;
      return getComputedStyle(probe).color;
    };
    const colours = { muted: v('--muted'), grid: v('--grid'), accent: v('--accent'), soft: v('--accent-soft') };
    probe.remove();
    const axis = { stroke: colours.muted, grid: { stroke: colours.grid, width: 1 }, ticks: { stroke: colours.grid },
      font: '11px system-ui, sans-serif' };
    const uPlot = globalThis.uPlot;
    return new uPlot({
      width: this.n.chart.clientWidth || 300,
      height: 170,
      legend: { show: false },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(5, Math.ceil(max * 1.15))] } },
      axes: [{ ...axis, space: 60, values: (u, splits) => splits.map((t) => hourMinute.format(new Date(t * 1000))) },
        { ...axis, size: 44 }],
      series: [
        {},
        { label: 'Orders', stroke: colours.accent, fill: colours.soft, width: 1,
          paths: uPlot.paths.bars({ size: [0.8, 24] }), points: { show: false } },
      ],
    }, data, this.n.chart);
  }

  async pollDeadLetters() {
    let res;
    try {
      res = await api.deadLetters(DLQ_LIMIT);
    } catch (e) {
      if (e.status === 404 || e.status === 401 || e.status === 403) {
        // No Kafka ingest on this server, or a token without the admin scope: no section.
        this.n.dlqSection.hidden = true;
        return;
      }
      this.dlqTimer = setTimeout(() => this.pollDeadLetters(), DLQ_INTERVAL_MS);
      return;
    }
    this.n.dlqSection.hidden = false;
    const items = res.items || [];
    this.n.dlqEmpty.hidden = items.length > 0;
    this.n.dlq.replaceChildren(...items.map((d) => {
      // {code, reason: text, at} as first specified, or {reason: code, detail: text, received_at}.
      const code = d.code ?? (d.detail != null ? d.reason : null);
      const text = d.detail ?? d.reason;
      const at = d.at ?? d.received_at;
      return el('tr', {},
        el('td', {}, el('time', { datetime: at }, fmtWhen(at))),
        el('td', { class: 'mono' }, `${d.topic}[${d.partition}]@${d.offset}`),
        el('td', {}, code ? el('span', { class: 'code' }, code) : null, code ? ' ' : null, text));
    }));
    this.dlqTimer = setTimeout(() => this.pollDeadLetters(), DLQ_INTERVAL_MS);
  }
}
