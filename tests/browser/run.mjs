// The dashboard in a real headless Chromium (/usr/bin/chromium, driven by
// playwright-core), against a real ordercast with its own PostgreSQL:
//   ORDERCAST_BIN=target/debug/ordercast node tests/browser/run.mjs [name-filter]
// Every wait is bounded; a screenshot of each test's page is saved in
// tests/browser/screenshots/; the last line is "N passed, M failed" and the
// exit code is non-zero on any failure. Everything started is stopped at the
// end, failure or not.

import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { mkdirSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { createRequire } from 'node:module';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ordercast, freePort, launchChromium, psql, seedOrders, sleep, within } from './harness.mjs';

const BIN = resolve(process.env.ORDERCAST_BIN || 'target/debug/ordercast');
const SHOTS = fileURLToPath(new URL('screenshots', import.meta.url));
const AXE = createRequire(import.meta.url).resolve('axe-core/axe.min.js');
const ONLY = process.argv[2] || '';
/** One test may take this long, the whole run this long. */
const TEST_LIMIT_MS = 120000;
const RUN_LIMIT_MS = 20 * 60000;
mkdirSync(SHOTS, { recursive: true });

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
const figures = [];
const figure = (text) => {
  figures.push(text);
  console.log(`     ${text}`);
};

let server;
let browser;

// --- helpers -------------------------------------------------------------------

/** A fresh page on the dashboard, collecting console errors; waits until the stream is live. */
async function openDashboard(t, { viewport = { width: 1366, height: 900 }, colorScheme = 'light', before } = {}) {
  const page = await browser.newPage({ viewport, colorScheme });
  t.page = page;
  page.setDefaultTimeout(10000);
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`${m.text()} (${m.location().url})`);
  });
  page.on('pageerror', (e) => errors.push(`uncaught: ${e.message}`));
  if (before) await before(page);
  await page.goto(server.url, { timeout: 15000 });
  await live(page);
  return { page, errors };
}

/** A server of its own for test `t` with the settings `env`, started; stopped after the test. */
async function startSecured(t, env) {
  const secured = new Ordercast(BIN, env);
  t.cleanup = () => secured.cleanup();
  await secured.start();
  return secured;
}

/** A fresh page for test `t` (its screenshot is taken at the end), waiting up to 10 s by default. */
async function newTestPage(t) {
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  t.page = page;
  page.setDefaultTimeout(10000);
  return page;
}

/** A fresh page on a server with tokens, once its sign-in dialog shows: { page, dialog }. */
async function openSignIn(t, app) {
  const page = await newTestPage(t);
  await page.goto(app.url);
  const dialog = page.locator('#signin');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  return { page, dialog };
}

/** Signs in with `token` through the dialog. */
async function submitToken(dialog, token) {
  await dialog.getByLabel('Token').fill(token);
  await dialog.getByRole('button', { name: 'Sign in' }).click();
}

const live = (page, timeout = 15000) => page.locator('#connection[data-phase="connected"]').waitFor({ timeout });
const row = (page, id) => page.locator(`#orders-body tr[data-id="${id}"]`);
/** Opens order `id`'s detail from its row, once the detail's stream has answered: the dialog. */
async function openDetail(page, id) {
  const followed = page.waitForResponse((r) => r.url().includes(`/api/orders/${id}/events`));
  await row(page, id).locator('button').click();
  await followed;
  return page.locator('#detail');
}
const tableIds = (page) => page.$$eval('#orders-body tr', (trs) => trs.map((tr) => Number(tr.dataset.id)));
const tableStatuses = (page) => page.$$eval('#orders-body tr', (trs) => trs.map((tr) => tr.dataset.status));
const sqlStr = (s) => `'${s.replaceAll("'", "''")}'`;

/** Inserts one order with psql; resolves with its id once committed. */
async function insertOrder({ customer, product = 'Bolt', status = 'pending', price = 2 }) {
  return Number(await server.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price, status)
    VALUES (${sqlStr(customer)}, ${sqlStr(product)}, 1, ${price}, ${sqlStr(status)}) RETURNING id`));
}

async function clickTab(page, status) {
  await page.locator(`#tab-${status}`).click();
  await page.locator(`#tab-${status}[aria-selected="true"]`).waitFor({ timeout: 5000 });
}

async function search(page, text) {
  await page.fill('#search', text);
  await page.press('#search', 'Enter');
}

/** Waits until every row in the table satisfies `pred(order row)`, and there is at least `min` of them. */
async function waitRows(page, pred, { min = 1, timeout = 3000 } = {}) {
  await page.waitForFunction(([src, n]) => {
    const rows = [...document.querySelectorAll('#orders-body tr')].map((tr) => ({
      id: Number(tr.dataset.id), status: tr.dataset.status, text: tr.textContent,
    }));
    // eslint-disable-next-line no-new-func
    return rows.length >= n && rows.every(new Function(`return (${src})`)());
  }, [pred.toString(), min], { timeout });
}

/** Fills the create form's inputs in `dialog`, by their labels. */
async function fillOrder(dialog, values) {
  for (const [label, value] of Object.entries(values)) await dialog.getByLabel(label).fill(value);
}

/** Waits (up to 5 s, polling) until `cond()` holds. */
async function until(cond, what) {
  const end = Date.now() + 5000;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out: ${what}`);
    await sleep(50);
  }
}

/** An HS256 JWT signed with `secret`. */
function jwt(secret, claims) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

// --- tests ---------------------------------------------------------------------------

test('the page loads without console errors under a strict CSP', async (t) => {
  const csp = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";
  const { page, errors } = await openDashboard(t, {
    before: (p) => p.route(`${server.url}/`, async (route) => {
      const res = await route.fetch();
      await route.fulfill({ response: res, headers: { ...res.headers(), 'content-security-policy': csp } });
    }),
  });
  const total = Number(await server.sql('SELECT count(*) FROM orders'));
  await page.locator('#kpi-orders', { hasText: total.toLocaleString('en-US') }).waitFor({ timeout: 5000 });
  assert.equal((await tableIds(page)).length, Math.min(total, 50));
  await page.locator('#chart canvas').first().waitFor({ timeout: 5000 });
  await page.locator('#products-body tr').first().waitFor();
  await sleep(1500); // anything asynchronous that would fail does so by now
  assert.deepEqual(errors, []);
  assert.ok(await page.locator('#dlq-section').isVisible(), 'the dead-letter section is shown');
});

test('dead-lettered ingest messages are listed with their reason', async (t) => {
  await server.sql(`INSERT INTO dead_letters (group_id, kafka_topic, kafka_partition, kafka_offset, payload, reason, detail)
    VALUES ('ordercast', 'orders', 2, 4711, '{"customer_name":""}', 'validation_failed', 'customer_name: must not be empty')`);
  const { page } = await openDashboard(t);
  const entry = page.locator('#dlq-body tr', { hasText: 'orders[2]@4711' });
  await entry.waitFor({ timeout: 5000 });
  assert.match(await entry.textContent(), /validation_failed\s+customer_name: must not be empty/);
});

test('a server without GET /api/dlq gets no dead-letter section and no error', async (t) => {
  // ordercast builds before the Kafka ingest had no such endpoint; stand in for one.
  const { page, errors } = await openDashboard(t, {
    before: (p) => p.route('**/api/dlq*', (route) => route.fulfill({
      status: 404, contentType: 'application/problem+json',
      body: JSON.stringify({ status: 404, code: 'not_found', message: 'no route for GET /api/dlq' }),
    })),
  });
  await page.locator('#products-body tr').first().waitFor();
  await sleep(1000);
  assert.equal(await page.locator('#dlq-section').isVisible(), false);
  // Chromium logs the 404 response itself; nothing else may be logged.
  assert.deepEqual(errors.filter((e) => !/status of 404 .*\/api\/dlq/.test(e)), []);
  assert.equal(await page.locator('.toast-error').count(), 0);
});

test('a row inserted with psql appears live, newest first and highlighted', async (t) => {
  const { page } = await openDashboard(t);
  const customer = `Psql Person ${Date.now()}`;
  const id = await insertOrder({ customer });
  const t0 = Date.now();
  await row(page, id).waitFor({ timeout: 5000 });
  figure(`psql INSERT committed -> row in the table: ${Date.now() - t0} ms`);
  assert.equal((await tableIds(page))[0], id, 'newest first');
  assert.match(await row(page, id).getAttribute('class'), /flash-/, 'the new row is highlighted');
  const entry = page.locator('#activity-list li', { hasText: `#${id}` });
  await entry.waitFor({ timeout: 5000 });
  assert.match(await entry.textContent(), /sql\s*postgres/);
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await row(page, id).locator('.badge', { hasText: 'Processing' }).waitFor({ timeout: 5000 });
});

test('rows stay put while the pointer moves over them, and new ones come in after', async (t) => {
  const { page } = await openDashboard(t);
  const first = (await tableIds(page))[0];
  const box = await row(page, first).boundingBox();
  const y = box.y + box.height / 2;
  await page.mouse.move(box.x + 40, y);
  const id = await insertOrder({ customer: 'Held Back' });
  for (let i = 0; i < 6; i++) {
    await sleep(200);
    await page.mouse.move(box.x + 41 + i, y);
  }
  assert.equal((await tableIds(page))[0], first, 'the row under the pointer did not move');
  assert.equal(await row(page, id).count(), 0);
  assert.match(await page.locator('#orders-summary').textContent(), /wait while the pointer moves/);
  await page.mouse.move(2, 2);
  await row(page, id).waitFor({ timeout: 5000 });
  assert.equal((await tableIds(page))[0], id);
});

test('with a slow /api/stats, one request at a time, and the totals still come', async (t) => {
  let inFlight = 0;
  let most = 0;
  const { page } = await openDashboard(t, {
    before: (p) => p.route('**/api/stats', async (route) => {
      inFlight += 1;
      most = Math.max(most, inFlight);
      await sleep(2500);
      inFlight -= 1;
      await route.continue();
    }),
  });
  for (let i = 0; i < 3; i++) {
    await insertOrder({ customer: `Slow Stats ${i}` });
    await sleep(1000);
  }
  const total = Number(await server.sql('SELECT count(*) FROM orders'));
  await page.locator('#kpi-orders', { hasText: new RegExp(`^${total.toLocaleString('en-US')}$`) }).waitFor({ timeout: 15000 });
  assert.equal(most, 1, 'never two requests for the totals at once');
});

test('with the browser\'s clock ten minutes fast, this minute\'s orders still count as the last 60 s\'s', async (t) => {
  const { page } = await openDashboard(t, { before: (p) => p.clock.install({ time: Date.now() + 10 * 60000 }) });
  for (let i = 0; i < 3; i++) await insertOrder({ customer: `Clock skew ${i}` });
  // Counted on the server's clock (its Date headers), not the browser's,
  // by which they were ten minutes old.
  await page.waitForFunction(() => Number(document.querySelector('#kpi-rate').textContent.replace(/[^0-9]/g, '')) >= 3,
    null, { timeout: 5000 });
});

test('the chart\'s counts are read again after a failed first read, and the error is said once', async (t) => {
  let refused = 0;
  const { page } = await openDashboard(t, {
    before: (p) => p.route((url) => url.pathname === '/api/orders' && url.searchParams.get('limit') === '500', (route) => {
      if (refused++ < 2) return route.fulfill({ status: 503, contentType: 'application/problem+json', body: '{"status":503,"code":"database_unavailable","message":"the database is unavailable: test"}' });
      return route.continue();
    }),
  });
  // Before, the chart stayed at "counted for the last 0 min" for the page's life.
  await page.waitForFunction(() => !/last 0 min/.test(document.querySelector('#chart-note').textContent) &&
    document.querySelector('#chart-note').textContent !== '', null, { timeout: 15000 });
  assert.equal(refused, 3);
  assert.equal(await page.locator('.toast', { hasText: 'Could not load recent orders for the chart' }).count(), 1);
});

test('the order dialog keeps the keyboard focus when the focused action goes away', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Focus Keeper' });
  await row(page, id).locator('button').click();
  const dialog = page.locator('#detail');
  await dialog.locator('#detail-fields dd', { hasText: 'Focus Keeper' }).waitFor();
  const focusIn = () => page.evaluate(() => {
    const a = document.activeElement;
    return a && document.querySelector('#detail').contains(a) && a.offsetParent !== null ? (a.id || a.tagName) : null;
  });
  // Keep: back on Delete… (shown once the order is read: focused before,
  // it would not take the focus, and Enter would press nothing)
  await page.locator('#detail-delete').waitFor();
  await page.locator('#detail-delete').focus();
  await page.waitForFunction(() => document.activeElement?.id === 'detail-delete');
  await page.keyboard.press('Enter');
  await page.locator('#delete-no').waitFor();
  await page.keyboard.press('Enter');
  assert.equal(await focusIn(), 'detail-delete');
  // Deleted by a DBA while its Delete… has the focus: the banner takes it.
  await server.sql(`DELETE FROM orders WHERE id = ${id}`);
  await page.locator('#detail-gone').waitFor({ timeout: 5000 });
  assert.equal(await focusIn(), 'detail-gone');
  await page.keyboard.press('Escape');
  // Cancelling hides Cancel order, which had the focus.
  const other = await insertOrder({ customer: 'Focus Keeper Two' });
  await row(page, other).locator('button').click();
  await dialog.locator('#detail-fields dd', { hasText: 'Focus Keeper Two' }).waitFor();
  await page.locator('#detail-cancel').focus();
  await page.keyboard.press('Enter');
  await page.locator('.toast', { hasText: `Order #${other} cancelled` }).waitFor({ timeout: 5000 });
  await page.locator('#detail-cancel').waitFor({ state: 'hidden' });
  assert.equal(await focusIn(), 'detail-title');
});

test('the keyboard focus stays on a row\'s button while its order changes', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Focus Keeper' });
  await row(page, id).waitFor({ timeout: 5000 });
  await row(page, id).locator('button').focus();
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await row(page, id).locator('.badge', { hasText: 'Processing' }).waitFor({ timeout: 5000 });
  assert.equal(await page.evaluate(() => document.activeElement?.closest('tr')?.dataset.id), String(id));
});

test('the keyboard focus stays in the table when its row goes', async (t) => {
  // Before, it fell to the top of the document (a keyboard or screen-reader
  // user lost their place): when a focused row left its status tab, and
  // after a delete from the order dialog, whose row goes once the change
  // comes.
  const { page } = await openDashboard(t);
  const inTable = () => page.evaluate(() => document.querySelector('.orders-table').contains(document.activeElement));
  await clickTab(page, 'pending');
  const a = await insertOrder({ customer: 'Focus Leaver' });
  const b = await insertOrder({ customer: 'Focus Neighbour' });
  await row(page, a).waitFor({ timeout: 5000 });
  await row(page, a).locator('button').focus();
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${a}`);
  await row(page, a).waitFor({ state: 'detached', timeout: 5000 });
  assert.ok(await inTable(), 'the focus stays in the table');
  assert.ok(await page.evaluate(() => document.activeElement.closest('#orders-body tr') !== null), 'on a row');
  await row(page, b).locator('button').press('Enter');
  await page.locator('#detail-fields dd', { hasText: 'Focus Neighbour' }).waitFor();
  await page.locator('#detail-delete').click();
  await page.locator('#delete-yes').click();
  await page.locator('#detail').waitFor({ state: 'hidden', timeout: 5000 });
  await row(page, b).waitFor({ state: 'detached', timeout: 5000 });
  assert.ok(await inTable(), 'the focus stays in the table after a delete');
});

test('status tabs filter the loaded rows and the incoming ones', async (t) => {
  const { page } = await openDashboard(t);
  await clickTab(page, 'processing');
  const processing = Number(await server.sql(`SELECT count(*) FROM orders WHERE status = 'processing'`));
  await waitRows(page, (r) => r.status === 'processing', { min: Math.min(processing, 50) });
  assert.equal((await tableIds(page)).length, Math.min(processing, 50));
  // Incoming: a matching order appears, another does not, one that leaves the status goes.
  const inTab = await insertOrder({ customer: 'Tab Match', status: 'processing' });
  const outOfTab = await insertOrder({ customer: 'Tab Miss', status: 'pending' });
  await row(page, inTab).waitFor({ timeout: 5000 });
  await server.sql(`UPDATE orders SET status = 'processed' WHERE id = ${inTab}`);
  await row(page, inTab).waitFor({ state: 'detached', timeout: 5000 });
  assert.equal(await row(page, outOfTab).count(), 0);
  assert.ok((await tableStatuses(page)).every((s) => s === 'processing'));
  await clickTab(page, 'pending');
  await row(page, outOfTab).waitFor({ timeout: 5000 });
  await waitRows(page, (r) => r.status === 'pending');
  await clickTab(page, 'all');
  await row(page, inTab).waitFor({ timeout: 5000 });
  // Tab counts come from the statistics.
  const pending = Number(await server.sql(`SELECT count(*) FROM orders WHERE status = 'pending'`));
  await page.locator('#tab-pending .tab-count', { hasText: pending.toLocaleString('en-US') }).waitFor({ timeout: 5000 });
});

test('a tab whose page could not load is loaded when the server answers again', async (t) => {
  // Before, the tab's filter applied to the old tab's rows and stayed so:
  // "All" showed the processing orders until the user clicked again.
  const { page } = await openDashboard(t);
  await clickTab(page, 'processing');
  await waitRows(page, (r) => r.status === 'processing');
  let refuse = true;
  let refused = 0;
  await page.route(/\/api\/orders\?/, (route) => {
    if (!refuse || new URL(route.request().url()).searchParams.has('status')) return route.continue();
    refused += 1;
    return route.fulfill({
      status: 503,
      contentType: 'application/problem+json',
      body: JSON.stringify({ status: 503, code: 'database_unavailable', message: 'the database is unavailable' }),
    });
  });
  await clickTab(page, 'all');
  await page.locator('.toast-error', { hasText: 'Could not load orders' }).waitFor({ timeout: 5000 });
  await within(10000, 'the page asked for again', (async () => {
    while (refused < 2) await sleep(50);
  })());
  assert.equal(await page.locator('.toast-error', { hasText: 'Could not load orders' }).count(), 1, 'said once');
  refuse = false;
  const newest = (await server.sql('SELECT id FROM orders ORDER BY id DESC LIMIT 50')).split('\n').map(Number);
  await page.waitForFunction((ids) => {
    const shown = [...document.querySelectorAll('#orders-body tr')].map((tr) => Number(tr.dataset.id));
    return shown.length === ids.length && shown.every((id, i) => id === ids[i]);
  }, newest, { timeout: 15000 });
  assert.ok((await tableStatuses(page)).some((s) => s !== 'processing'), 'the rows of every status');
});

test('a page refused for what it asks is not asked for again', async (t) => {
  // A 4xx (here a 422 for a search the server refuses) would be refused
  // again: said once, not asked again every 10 s with Older and Newer held.
  const { page } = await openDashboard(t);
  let asked = 0;
  await page.route(/\/api\/orders\?/, (route) => {
    if (!new URL(route.request().url()).searchParams.has('q')) return route.continue();
    asked += 1;
    return route.fulfill({
      status: 422,
      contentType: 'application/problem+json',
      body: JSON.stringify({ status: 422, code: 'validation_failed', message: 'q is refused by the test', field: 'q' }),
    });
  });
  await search(page, 'refused');
  await page.locator('.toast-error', { hasText: 'q is refused by the test' }).waitFor({ timeout: 5000 });
  await sleep(3000);
  assert.equal(asked, 1, 'asked once');
});

test('search finds orders by customer, product and id, also among incoming ones', async (t) => {
  const { page } = await openDashboard(t);
  const a = await insertOrder({ customer: 'Zelda Quartermain', product: 'Brass telescope' });
  const b = await insertOrder({ customer: 'Otto Lindqvist', product: 'Sextant' });
  await row(page, b).waitFor({ timeout: 5000 });
  await search(page, 'quarterMAIN');
  await waitRows(page, (r) => /Zelda Quartermain/.test(r.text));
  assert.deepEqual(await tableIds(page), [a]);
  const c = await insertOrder({ customer: 'Zelda Quartermain', product: 'Star chart' });
  await insertOrder({ customer: 'Nobody Else', product: 'Quill' });
  await row(page, c).waitFor({ timeout: 5000 });
  await sleep(300);
  assert.deepEqual(await tableIds(page), [c, a]);
  await search(page, 'sextant');
  await waitRows(page, (r) => /Sextant/.test(r.text));
  assert.deepEqual(await tableIds(page), [b]);
  await search(page, `#${a}`);
  await waitRows(page, (r) => r.text.includes('Brass telescope'));
  assert.deepEqual(await tableIds(page), [a]);
  await search(page, 'no such order anywhere');
  await page.locator('#orders-empty').waitFor({ state: 'visible', timeout: 5000 });
  await search(page, '');
  await row(page, c).waitFor({ timeout: 5000 });
});

test('older pages are reached by keyset paging, and newer orders are announced there', async (t) => {
  const { page } = await openDashboard(t);
  const first = await tableIds(page);
  assert.equal(first.length, 50);
  // A double click moves one page: the second lands while the page is on its way.
  await page.getByRole('button', { name: 'Older →' }).dblclick();
  await page.waitForFunction((last) => Number(document.querySelector('#orders-body tr')?.dataset.id) < last, first[49], { timeout: 5000 });
  const second = await tableIds(page);
  const expected = (await server.sql(`SELECT id FROM orders WHERE id < ${first[49]} ORDER BY id DESC LIMIT 50`)).split('\n').map(Number);
  assert.deepEqual(second, expected);
  assert.match(await page.locator('#orders-summary').textContent(), /Page 2/);
  // Screen readers are told the page once; the summary itself is not live.
  const said = page.locator('#orders-status[role="status"]');
  assert.equal(await said.textContent(), `Page 2 · 50 orders · #${second[0]} to #${second[49]}`);
  assert.equal(await page.locator('#orders-summary').getAttribute('aria-live'), null);
  // A new order does not push rows around on page 2; it is announced.
  const id = await insertOrder({ customer: 'While on page two' });
  const notice = page.locator('#newer-notice', { hasText: '1 newer order' });
  await notice.waitFor({ timeout: 5000 });
  assert.deepEqual(await tableIds(page), second);
  // A change to a row on this page still shows in place.
  await server.sql(`UPDATE orders SET customer_name = 'Renamed on page two' WHERE id = ${second[3]}`);
  await row(page, second[3]).getByText('Renamed on page two').waitFor({ timeout: 5000 });
  await notice.click();
  await row(page, id).waitFor({ timeout: 5000 });
  assert.equal((await tableIds(page))[0], id);
  await said.filter({ hasText: `Page 1 · 50 orders · #${id} to` }).waitFor({ timeout: 5000 });
  // Live orders on page 1 change the summary, not what was said.
  const later = await insertOrder({ customer: 'After the announcement' });
  await page.locator('#orders-summary', { hasText: `#${later} to` }).waitFor({ timeout: 5000 });
  assert.match(await said.textContent(), new RegExp(`^Page 1 · 50 orders · #${id} to`));
});

test('an order that comes into a full last page makes an older page', async (t) => {
  const { page } = await openDashboard(t);
  const product = `Fullpage${Date.now()}`;
  const older = await insertOrder({ customer: 'Older than the page', product: 'Elsewhere' });
  await server.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price)
    SELECT 'Full ' || g, '${product}', 1, 2 FROM generate_series(1, 50) g`);
  await search(page, product);
  await page.waitForFunction((text) => {
    const rows = [...document.querySelectorAll('#orders-body tr')];
    return rows.length === 50 && rows.every((tr) => tr.textContent.includes(text));
  }, product, { timeout: 5000 });
  const olderButton = page.locator('#page-older');
  assert.equal(await olderButton.isDisabled(), true, 'exactly 50 match: no older page yet');
  // The older order comes into the search: it belongs on a page after this one.
  await server.sql(`UPDATE orders SET product = '${product}' WHERE id = ${older}`);
  await page.locator('#page-older:not([disabled])').waitFor({ timeout: 5000 });
  assert.equal((await tableIds(page)).length, 50);
  await olderButton.click();
  await row(page, older).waitFor({ timeout: 5000 });
  assert.deepEqual(await tableIds(page), [older]);
});

test('a change that arrives while a page is loading is brought into that page', async (t) => {
  const { page } = await openDashboard(t);
  const before = await insertOrder({ customer: 'Before The Load', product: 'Kettle' });
  await row(page, before).waitFor({ timeout: 5000 });
  // The pending tab's page is read, then an order is created and the
  // stream delivers it, and only then does the page arrive (without it).
  let during = null;
  let answered = false;
  await page.route(/\/api\/orders\?(.*&)?status=pending/, async (route) => {
    const res = await route.fetch();
    if (during == null) {
      during = await insertOrder({ customer: 'During The Load', product: 'Kettle' });
      await page.locator('#activity-list li', { hasText: `created #${during}` }).first().waitFor({ timeout: 5000 });
    }
    await route.fulfill({ response: res });
    answered = true;
  });
  await clickTab(page, 'pending');
  await within(10000, 'the pending page answered', (async () => {
    while (!answered) await sleep(20);
  })());
  // Drawn once the page's answer is taken in.
  await row(page, during).waitFor({ timeout: 5000 });
  await row(page, before).waitFor({ timeout: 5000 });
  const ids = await tableIds(page);
  assert.equal(ids.filter((id) => id === during).length, 1, 'the order created during the load is shown once');
  assert.equal(ids.filter((id) => id === before).length, 1, 'the order created before the load is shown once');
  assert.ok((await tableStatuses(page)).every((s) => s === 'pending'));
  // Between loads nothing is kept, and the next load is brought up to date as well.
  await page.unroute(/\/api\/orders\?(.*&)?status=pending/);
  const later = await insertOrder({ customer: 'After The Load', product: 'Kettle' });
  await row(page, later).waitFor({ timeout: 5000 });
  await clickTab(page, 'all');
  await row(page, later).waitFor({ timeout: 5000 });
  await row(page, during).waitFor({ timeout: 5000 });
});

test('a tab clicked before the first page arrives still opens the stream at the page\'s position', async (t) => {
  const page = await newTestPage(t);
  const head = Number(await server.sql('SELECT change_head()'));
  // The first two pages (the start-up's and the tab's) are held until released, in that order.
  const held = [];
  await page.route(/\/api\/orders\?/, async (route) => {
    if (held.length >= 2) return route.continue();
    await new Promise((release) => held.push(release));
    return route.continue();
  });
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(ws.url()));
  await page.goto(server.url);
  await page.waitForFunction(() => document.readyState === 'complete');
  await within(5000, 'the first page request', (async () => {
    while (held.length < 1) await sleep(20);
  })());
  await page.locator('#tab-pending').click();
  await within(5000, 'the tab\'s page request', (async () => {
    while (held.length < 2) await sleep(20);
  })());
  held[0]();
  await sleep(500); // the start-up's page is answered (and superseded) first
  held[1]();
  await live(page);
  await waitRows(page, (r) => r.status === 'pending');
  assert.ok(sockets.length >= 1, 'the stream opened');
  for (const url of sockets) {
    assert.equal(new URL(url).searchParams.get('since'), String(head), `${url} resumes at the page's position`);
  }
  const id = await insertOrder({ customer: 'After a quick click' });
  await row(page, id).waitFor({ timeout: 5000 });
  // (The entries from before the page are marked as such: see the next test.)
  assert.equal(await page.locator('#activity-list li:not(.act-earlier)', { hasText: 'created #' }).count(), 1, 'no history replayed as live');
});

test('the activity feed starts with what happened before the page, newest first, live changes above', async (t) => {
  const earlier = await insertOrder({ customer: 'Before the page' });
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${earlier}`);
  const { page } = await openDashboard(t);
  const entries = page.locator('#activity-list li.act-earlier');
  await entries.nth(1).waitFor({ timeout: 5000 });
  const [newest, before] = await entries.evaluateAll((lis) => lis.slice(0, 2).map((li) => li.textContent));
  assert.match(newest, new RegExp(`updated #${earlier}\\b`));
  assert.match(newest, /sql\s*postgres/, 'who made it');
  assert.match(before, new RegExp(`created #${earlier}\\b`));
  const later = await insertOrder({ customer: 'After the page' });
  await page.locator('#activity-list li:first-child:not(.act-earlier)', { hasText: `created #${later}` }).waitFor({ timeout: 5000 });
  assert.equal(await page.locator('#activity-list li', { hasText: `created #${earlier} ` }).count(), 1, 'shown once');
});

test('an order created through the form appears in the table', async (t) => {
  const { page } = await openDashboard(t);
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await dialog.getByLabel('Customer name').fill('Form Filler');
  await dialog.getByLabel('Customer email').fill('form.filler@example.com');
  await dialog.getByLabel('Product').fill('Walnut desk organiser');
  await dialog.getByLabel('Quantity').fill('3');
  await dialog.getByLabel('Unit price').fill('24.50');
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  await page.locator('.toast', { hasText: /Order #\d+ created/ }).waitFor({ timeout: 5000 });
  const id = Number(await server.sql(`SELECT id FROM orders WHERE customer_name = 'Form Filler'`));
  await row(page, id).waitFor({ timeout: 5000 });
  assert.match(await row(page, id).textContent(), /73\.50/);
  const by = await server.sql(`SELECT changed_by FROM order_status_history WHERE order_id = ${id}`);
  assert.match(by, /^api:/);
  // The random-order button creates a real order too.
  const before = Number(await server.sql('SELECT max(id) FROM orders'));
  await page.getByRole('button', { name: 'Random order' }).click();
  await page.waitForFunction((max) => Number(document.querySelector('#orders-body tr')?.dataset.id) > max, before, { timeout: 5000 });
});

test('an error raised in a dialog is shown above it and can be dismissed there', async (t) => {
  const { page } = await openDashboard(t);
  await page.route('**/api/orders', (route) => (route.request().method() === 'POST'
    ? route.fulfill({ status: 503, contentType: 'application/problem+json',
      body: JSON.stringify({ status: 503, code: 'database_unavailable', message: 'the database is unavailable: restarting' }) })
    : route.continue()));
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await fillOrder(dialog, { 'Customer name': 'Behind The Backdrop', Product: 'Lamp', Quantity: '1', 'Unit price': '5' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  const shown = page.locator('.toast-error', { hasText: 'restarting' });
  await shown.waitFor({ timeout: 5000 });
  // A click reaches it (under the backdrop, the dialog's would take it).
  await shown.getByRole('button', { name: 'Dismiss' }).click({ timeout: 3000 });
  await shown.waitFor({ state: 'detached', timeout: 2000 });
  assert.equal(await dialog.isVisible(), true, 'the form stays open with what was typed');
  assert.equal(await dialog.getByLabel('Customer name').inputValue(), 'Behind The Backdrop');
  // A toast already on screen when a dialog opens moves above it too.
  await dialog.locator('[data-close]').first().click();
  await page.unroute('**/api/orders');
  await page.getByRole('button', { name: 'Random order' }).click();
  const earlier = page.locator('.toast', { hasText: /Order #\d+ created/ });
  await earlier.waitFor({ timeout: 5000 });
  await page.getByRole('button', { name: 'New order' }).click();
  await dialog.waitFor({ state: 'visible' });
  await earlier.getByRole('button', { name: 'Dismiss' }).click({ timeout: 3000 });
  await earlier.waitFor({ state: 'detached', timeout: 2000 });
});

test('an invalid form shows the server\'s error next to the field', async (t) => {
  const { page } = await openDashboard(t);
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await fillOrder(dialog, { 'Customer name': 'Valid Name', Product: 'Lamp', Quantity: '0', 'Unit price': '5' });
  const count = await server.sql('SELECT count(*) FROM orders');
  await dialog.getByRole('button', { name: 'Create order' }).click();
  const error = dialog.locator('#e-quantity');
  await error.waitFor({ state: 'visible', timeout: 5000 });
  // The message is the server's own.
  const res = await fetch(`${server.url}/api/orders`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ customer_name: 'Valid Name', product: 'Lamp', quantity: 0, unit_price: '5' }),
  });
  const problem = await res.json();
  assert.equal(res.status, 422);
  assert.equal(problem.field, 'quantity');
  assert.equal(problem.message.replace(/^quantity:\s*/, ''), await error.textContent());
  assert.equal(await dialog.getByLabel('Quantity').getAttribute('aria-invalid'), 'true');
  assert.ok(await dialog.isVisible(), 'the form stays open');
  // Another field: the error moves there.
  await dialog.getByLabel('Quantity').fill('2');
  await dialog.getByLabel('Customer email').fill('not-an-email');
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.locator('#e-customer_email', { hasText: 'must be an email address' }).waitFor({ timeout: 5000 });
  assert.equal(await error.isVisible(), false);
  assert.equal(await server.sql('SELECT count(*) FROM orders'), count, 'nothing was created');
});

test('a change to the open order keeps the status the user chose, unless the status itself moved', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Choice Keeper', product: 'Dial' });
  const dialog = await openDetail(page, id);
  await dialog.locator('#status-select option[value="processed"]').waitFor({ state: 'attached' });
  await dialog.locator('#status-select').selectOption('processed');
  // Another field changes elsewhere: the choices are rebuilt, the choice stays.
  await server.sql(`UPDATE orders SET quantity = 4 WHERE id = ${id}`);
  await dialog.locator('#detail-changes li', { hasText: 'quantity' }).waitFor({ timeout: 5000 });
  await sleep(300);
  assert.equal(await dialog.locator('#status-select').inputValue(), 'processed');
  // The status moves elsewhere: no choice carries over, Apply waits for one.
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Processing' }).waitFor({ timeout: 5000 });
  await sleep(300);
  assert.equal(await dialog.locator('#status-select').inputValue(), '');
  assert.equal(await dialog.getByRole('button', { name: 'Apply' }).isDisabled(), true);
  await dialog.locator('#status-select').selectOption('processed');
  await dialog.getByRole('button', { name: 'Apply' }).click();
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Processed' }).waitFor({ timeout: 5000 });
  assert.equal(await server.sql(`SELECT status FROM orders WHERE id = ${id}`), 'processed');
  // After its own change (and the stream's echo of it), and another change
  // elsewhere, the panel still offers no choice nobody made.
  await server.sql(`UPDATE orders SET customer_email = 'keeper@mail.example' WHERE id = ${id}`);
  await dialog.locator('#detail-fields dd', { hasText: 'keeper@mail.example' }).waitFor({ timeout: 5000 });
  await sleep(300);
  assert.equal(await dialog.locator('#status-select').inputValue(), '');
  assert.equal(await dialog.getByRole('button', { name: 'Apply' }).isDisabled(), true);
});

test('an action\'s answer that arrives after a newer version of the order is not shown over it', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Late Answer', product: 'Clock' });
  const dialog = await openDetail(page, id);
  await dialog.locator('#status-select option[value="processing"]').waitFor({ state: 'attached' });
  // The PATCH is answered, but its answer reaches the page only after the
  // order has moved on (the processor's next step) and the stream said so.
  await page.route(`**/api/orders/${id}`, async (route) => {
    if (route.request().method() !== 'PATCH') return route.continue();
    const answer = await route.fetch();
    await server.sql(`UPDATE orders SET status = 'processed' WHERE id = ${id}`);
    await dialog.locator('#detail-fields dd .badge', { hasText: 'Processed' }).waitFor({ timeout: 5000 });
    await route.fulfill({ response: answer });
  });
  await dialog.locator('#status-select').selectOption('processing');
  await dialog.getByRole('button', { name: 'Apply' }).click();
  await page.locator('.toast', { hasText: `Order #${id} is now Processing` }).waitFor({ timeout: 10000 });
  await sleep(300);
  assert.equal(await dialog.locator('#detail-fields dd .badge').first().textContent(), 'Processed');
  const offered = await dialog.locator('#status-select option').evaluateAll((os) => os.map((o) => o.value));
  assert.deepEqual(offered, ['shipped']);
});

test('the order detail shows the history last asked for, whatever order the answers come in', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'History Racer', product: 'Hourglass' });
  let asked = 0;
  let release;
  const held = new Promise((resolve) => {
    release = resolve;
  });
  const answered = [];
  await page.route(`**/api/orders/${id}/history`, async (route) => {
    asked += 1;
    const n = asked;
    const answer = await route.fetch();
    // The reload after the first status change answers last.
    if (n === 2) await held;
    await route.fulfill({ response: answer });
    answered.push(n);
  });
  const dialog = await openDetail(page, id);
  await dialog.locator('#detail-history li', { hasText: 'Created as' }).waitFor();
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await until(() => asked >= 2, 'the reload after the first change is asked');
  await server.sql(`UPDATE orders SET status = 'processed' WHERE id = ${id}`);
  await dialog.locator('#detail-history li', { hasText: /Processing\s*→\s*Processed/ }).waitFor({ timeout: 5000 });
  release();
  await until(() => answered.includes(2), 'the held reload is answered');
  await sleep(300);
  assert.equal(await dialog.locator('#detail-history li', { hasText: /Processing\s*→\s*Processed/ }).count(), 1);
});

test('the order detail shows history, offers only allowed transitions and stays live', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Detail Watcher', product: 'Globe' });
  // (Changes reload the history once the dialog follows the order's stream.)
  const dialog = await openDetail(page, id);
  await dialog.locator('#detail-title', { hasText: `Order #${id}` }).waitFor();
  await dialog.locator('#detail-history li', { hasText: 'Created as' }).waitFor();
  // The history and the transition choices are filled by separate requests.
  await dialog.locator('#status-select option').first().waitFor({ state: 'attached' });
  const options = await dialog.locator('#status-select option').evaluateAll((os) => os.map((o) => o.value).sort());
  const allowed = JSON.parse(await (await fetch(`${server.url}/api/transitions`)).text()).pending;
  assert.deepEqual(options, allowed.filter((s) => s !== 'cancelled').sort());
  assert.ok(await dialog.getByRole('button', { name: 'Cancel order' }).isVisible());
  // Change status through the dialog.
  await dialog.locator('#status-select').selectOption('processing');
  await dialog.getByRole('button', { name: 'Apply' }).click();
  await dialog.locator('#detail-history li', { hasText: /Pending\s*→\s*Processing/ }).waitFor({ timeout: 5000 });
  assert.match(await dialog.locator('#detail-history li').last().textContent(), /api:/);
  // A change made elsewhere (psql) shows up while the dialog is open.
  await server.sql(`UPDATE orders SET status = 'processed' WHERE id = ${id}`);
  await dialog.locator('#detail-changes li', { hasText: 'sql:postgres' }).waitFor({ timeout: 5000 });
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Processed' }).waitFor({ timeout: 5000 });
  await dialog.locator('#detail-history li', { hasText: /Processing\s*→\s*Processed/ }).waitFor({ timeout: 5000 });
  const after = await dialog.locator('#status-select option').evaluateAll((os) => os.map((o) => o.value));
  assert.deepEqual(after, ['shipped']);
  // Cancel, offered because processed -> cancelled is allowed.
  await dialog.getByRole('button', { name: 'Cancel order' }).click();
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Cancelled' }).waitFor({ timeout: 5000 });
  await page.locator('.toast', { hasText: `Order #${id} cancelled` }).waitFor({ timeout: 5000 });
  await row(page, id).locator('.badge', { hasText: 'Cancelled' }).waitFor({ timeout: 5000 });
  assert.equal(await dialog.locator('#status-form').isVisible(), false, 'a cancelled order has nowhere to go');
  assert.equal(await dialog.getByRole('button', { name: 'Cancel order' }).isVisible(), false);
  // Delete, with confirmation.
  await dialog.getByRole('button', { name: 'Delete…' }).click();
  await dialog.getByRole('button', { name: 'Keep' }).click();
  assert.equal(await server.sql(`SELECT count(*) FROM orders WHERE id = ${id}`), '1');
  await dialog.getByRole('button', { name: 'Delete…' }).click();
  await dialog.getByRole('button', { name: 'Yes, delete' }).click();
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  await row(page, id).waitFor({ state: 'detached', timeout: 5000 });
  assert.equal(await server.sql(`SELECT count(*) FROM orders WHERE id = ${id}`), '0');
});

test('the dashboard is accessible in light and dark and usable by keyboard', async (t) => {
  for (const colorScheme of ['light', 'dark']) {
    const { page } = await openDashboard(t, { colorScheme });
    await page.locator('#products-body tr').first().waitFor();
    await page.addScriptTag({ path: AXE });
    const audit = () => page.evaluate(async () => {
      const r = await globalThis.axe.run(document, { runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] });
      return r.violations.map((v) => `${v.id}: ${v.help} (${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join(', ')})`);
    });
    assert.deepEqual(await audit(), [], `${colorScheme}: page`);
    // Keyboard: "/" goes to search; arrows move between status tabs.
    await page.locator('body').press('/');
    assert.equal(await page.evaluate(() => document.activeElement.id), 'search');
    await page.locator('#tab-all').focus();
    await page.keyboard.press('ArrowRight');
    await page.locator('#tab-pending[aria-selected="true"]').waitFor({ timeout: 5000 });
    assert.equal(await page.evaluate(() => document.activeElement.id), 'tab-pending');
    // The tab reloads the table: a row focused before its page arrives can
    // be rendered anew under the key press (seen once on a loaded machine).
    const reloaded = page.waitForResponse((r) => new URL(r.url()).pathname === '/api/orders');
    await page.keyboard.press('Home');
    await page.locator('#tab-all[aria-selected="true"]').waitFor({ timeout: 5000 });
    await (await reloaded).finished();
    await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
    // Rows open with Enter; the dialog closes with Escape.
    await page.locator('#orders-body tr button').first().press('Enter');
    await page.locator('#detail-history li').first().waitFor();
    assert.deepEqual(await audit(), [], `${colorScheme}: order detail`);
    await page.keyboard.press('Escape');
    await page.locator('#detail').waitFor({ state: 'hidden', timeout: 5000 });
    await page.getByRole('button', { name: 'New order' }).click();
    await page.locator('#create-form button[type=submit]').click();
    await page.locator('#e-customer_name').waitFor({ state: 'visible' });
    assert.deepEqual(await audit(), [], `${colorScheme}: form with an error`);
    await page.screenshot({ path: join(SHOTS, `accessibility-${colorScheme}.png`) });
    await page.close();
  }
  t.page = null;
});

test('the theme toggle switches between light and dark', async (t) => {
  const { page } = await openDashboard(t, { colorScheme: 'light' });
  const bg = () => page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  const light = await bg();
  await page.getByRole('button', { name: 'Switch to dark theme' }).click();
  assert.notEqual(await bg(), light);
  assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), 'dark');
  await page.reload();
  await live(page);
  assert.equal(await page.evaluate(() => document.documentElement.dataset.theme), 'dark', 'the choice is kept');
  await page.getByRole('button', { name: 'Switch to light theme' }).click();
  assert.equal(await bg(), light);
});

test('the layout fits a phone screen', async (t) => {
  const { page } = await openDashboard(t, { viewport: { width: 390, height: 844 } });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than the screen`);
  for (const name of ['New order', 'Random order']) assert.ok(await page.getByRole('button', { name }).isVisible());
  await page.locator('#orders-body tr button').first().click();
  const box = await page.locator('#detail').boundingBox();
  assert.ok(box.x >= 0 && box.x + box.width <= 390, 'the detail dialog fits');
});

test('with tokens configured, the dashboard asks for one, then goes live', async (t) => {
  const secured = await startSecured(t, {
    ORDERCAST_API_KEYS: 'viewer:viewer-secret-1:read,ops:ops-secret-2:read+write,writer:writer-secret-3:write',
  });
  const { page, dialog } = await openSignIn(t, secured);
  await submitToken(dialog, 'wrong-token');
  await dialog.locator('#e-token', { hasText: 'Not accepted' }).waitFor({ timeout: 5000 });
  await submitToken(dialog, 'viewer-secret-1');
  await live(page);
  assert.equal(await page.locator('#signin').isVisible(), false);
  const id = Number(await secured.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price)
    VALUES ('Token Holder', 'Key', 1, 1) RETURNING id`));
  await row(page, id).waitFor({ timeout: 5000 });
  // The token is in an HttpOnly cookie: no script on the page can read it.
  assert.equal(await page.evaluate(() => document.cookie), '');
  const [cookie] = await page.context().cookies();
  assert.deepEqual([cookie.name, cookie.value, cookie.httpOnly, cookie.sameSite], ['ordercast_token', 'viewer-secret-1', true, 'Strict']);
  // A read-only token may look but is offered no changes.
  await page.locator('html[data-read-only]').waitFor({ state: 'attached', timeout: 5000 });
  assert.equal(await page.getByRole('button', { name: 'New order' }).isVisible(), false);
  assert.equal(await page.getByRole('button', { name: 'Random order' }).isVisible(), false);
  await row(page, id).locator('button').click();
  await page.locator('#detail-fields dd', { hasText: 'Token Holder' }).waitFor();
  assert.equal(await page.locator('#detail-actions').isVisible(), false, 'no status change, cancel or delete');
  await page.locator('#detail [data-close]').first().click();
  assert.equal(await page.locator('#dlq-section').isVisible(), false, 'dead letters need the admin scope');
  await page.getByRole('button', { name: 'Sign out' }).click();
  await dialog.waitFor({ state: 'visible', timeout: 10000 });
  assert.deepEqual(await page.context().cookies(), [], 'signing out removes the cookie');
  // A token that cannot read orders is turned away, and not kept.
  await submitToken(dialog, 'writer-secret-3');
  await dialog.locator('#e-token', { hasText: 'lacks the read scope' }).waitFor({ timeout: 5000 });
  assert.deepEqual(await page.context().cookies(), [], 'nothing kept');
  // A writer is offered changes (once the page knows who it is: Sign out shows).
  await submitToken(dialog, 'ops-secret-2');
  await live(page);
  await page.getByRole('button', { name: 'Sign out' }).waitFor({ timeout: 5000 });
  assert.equal(await page.getByRole('button', { name: 'New order' }).isVisible(), true);
  assert.equal(await page.locator('html[data-read-only]').count(), 0);
});

test('without a token, the first page is not asked for again while the sign-in is open', async (t) => {
  const secured = await startSecured(t, { ORDERCAST_API_KEYS: 'ops:ops-secret-2:read+write' });
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  t.page = page;
  let asked = 0;
  page.on('request', (r) => {
    if (new URL(r.url()).pathname === '/api/orders') asked += 1;
  });
  await page.clock.install();
  await page.goto(secured.url);
  const dialog = page.locator('#signin');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  await page.clock.fastForward('01:00');
  await sleep(500);
  // Backoff alone would have asked about seven times more by now.
  assert.equal(asked, 1, 'the orders asked for once');
  await submitToken(dialog, 'ops-secret-2');
  await live(page);
});

test('a token an older dashboard kept readable by scripts is forgotten, and the user signs in once more', async (t) => {
  const secured = await startSecured(t, { ORDERCAST_API_KEYS: 'ops:ops-secret-2:read+write' });
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  t.page = page;
  await page.context().addCookies([{ name: 'ordercast_token', value: 'ops-secret-2', url: secured.url, sameSite: 'Strict' }]);
  await page.goto(secured.url);
  const dialog = page.locator('#signin');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  assert.equal(await page.evaluate(() => document.cookie), '');
  await submitToken(dialog, 'ops-secret-2');
  await live(page);
  const [cookie] = await page.context().cookies();
  assert.deepEqual([cookie.value, cookie.httpOnly], ['ops-secret-2', true]);
  assert.equal(await page.evaluate(() => document.cookie), '');
});

test('with a customer-confined token, an order moved away leaves the page and one moved in appears', async (t) => {
  const secured = await startSecured(t, { ORDERCAST_API_KEYS: 'ada:ada-secret-1:read:customer=Ada' });
  const insert = async (customer) => Number(await secured.sql(`INSERT INTO orders (customer_name, customer_email,
    product, quantity, unit_price) VALUES (${sqlStr(customer)}, ${sqlStr(`${customer.toLowerCase()}@mail.example`)},
    'Lamp', 1, 1) RETURNING id`));
  const mine = await insert('Ada');
  const theirs = await insert('Bob');
  const { page, dialog: signin } = await openSignIn(t, secured);
  await submitToken(signin, 'ada-secret-1');
  await live(page);
  await row(page, mine).waitFor({ timeout: 5000 });
  assert.deepEqual(await tableIds(page), [mine]);
  // The order is open (and followed by its own stream) when a DBA gives it
  // to Bob.
  const dialog = await openDetail(page, mine);
  await dialog.locator('#detail-fields dd', { hasText: 'ada@mail.example' }).waitFor();
  await secured.sql(`UPDATE orders SET customer_name = 'Bob', customer_email = 'bob@mail.example' WHERE id = ${mine}`);
  await dialog.locator('#detail-gone', { hasText: 'no longer visible' }).waitFor({ timeout: 5000 });
  await dialog.locator('#detail-changes li', { hasText: 'moved away' }).waitFor({ timeout: 5000 });
  await row(page, mine).waitFor({ state: 'detached', timeout: 5000 });
  await page.locator('#activity-list li', { hasText: `moved away #${mine}` }).waitFor({ timeout: 5000 });
  await dialog.locator('[data-close]').first().click();
  // Bob's order becomes Ada's.
  await secured.sql(`UPDATE orders SET customer_name = 'Ada', customer_email = 'ada@mail.example' WHERE id = ${theirs}`);
  await row(page, theirs).locator('.customer', { hasText: 'Ada' }).waitFor({ timeout: 5000 });
  await page.locator('#activity-list li', { hasText: `moved in #${theirs}` }).waitFor({ timeout: 5000 });
  assert.deepEqual(await tableIds(page), [theirs]);
  const text = await page.locator('body').textContent();
  assert.ok(!/bob/i.test(text), 'nothing of Bob\'s reaches the page');
});

test('with a confined token, a page that arrives after the stream moved past others\' changes is taken', async (t) => {
  const secured = await startSecured(t, { ORDERCAST_API_KEYS: 'ada:ada-secret-1:read:customer=Ada' });
  const insert = async (customer) => Number(await secured.sql(`INSERT INTO orders (customer_name, product, quantity,
    unit_price) VALUES (${sqlStr(customer)}, 'Lamp', 1, 1) RETURNING id`));
  const mine = await insert('Ada');
  const page = await newTestPage(t);
  // The stream passes through the test, which can tell the page what the
  // server's heartbeat tells a confined client: its position moved past
  // changes that are not its customer's.
  let toPage = null;
  await page.routeWebSocket(/\/ws/, (ws) => {
    ws.connectToServer();
    toPage = ws;
  });
  // While armed, each page of orders is answered as the server gave it, but
  // only after Bob's order committed and the stream moved past it.
  let armed = false;
  let pages = 0;
  let answered = 0;
  await page.route(/\/api\/orders\?/, async (route) => {
    if (!armed) return route.continue();
    pages += 1;
    const res = await route.fetch();
    await insert('Bob');
    const head = Number(await secured.sql('SELECT change_head()'));
    toPage.send(JSON.stringify({ type: 'position', seq: head }));
    await sleep(300);
    await route.fulfill({ response: res });
    answered += 1;
  });
  await page.goto(secured.url);
  const dialog = page.locator('#signin');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  await submitToken(dialog, 'ada-secret-1');
  await live(page);
  await row(page, mine).waitFor({ timeout: 5000 });
  armed = true;
  await search(page, 'Lamp');
  await within(15000, 'the search\'s page answered', (async () => {
    while (answered < 1) await sleep(20);
  })());
  // A retry would be asked for at once; it is counted too (still armed).
  await sleep(1500);
  // Before, the page was checked for changes at every position after its
  // own: Bob's were missing, so it was asked for again, and again, and the
  // load failed after three.
  assert.equal(pages, 1, 'the page was asked for once');
  assert.equal(await page.locator('.toast-error').count(), 0);
  assert.deepEqual(await tableIds(page), [mine]);
  // Live changes still come.
  const next = await insert('Ada');
  await row(page, next).waitFor({ timeout: 5000 });
});

test('a customer-confined writer\'s random orders are its customer\'s', async (t) => {
  const secured = await startSecured(t, { ORDERCAST_API_KEYS: 'ada:ada-secret-1:read+write:customer=Ada' });
  const { page, dialog } = await openSignIn(t, secured);
  await submitToken(dialog, 'ada-secret-1');
  await live(page);
  await page.getByRole('button', { name: 'Sign out' }).waitFor({ timeout: 5000 });
  // Before, a random customer's name: refused with 403 every time.
  await page.getByRole('button', { name: 'Random order' }).click();
  // Named as the key names the customer, not in its lowercased form.
  await page.locator('.toast-ok', { hasText: /created for Ada\b/ }).waitFor({ timeout: 5000 });
  await page.locator('#orders-body tr .customer', { hasText: /Ada/ }).waitFor({ timeout: 5000 });
  assert.equal(await page.locator('.toast-error').count(), 0);
});

/**
 * Opens `secured` on `page` and signs in with a read JWT signed with
 * `secret` that expires in 15 s (long enough for signing in and going live
 * on a slow machine); answers once the page is live over `transport`:
 * { dialog, exp }.
 */
async function liveWithShortLivedToken(page, secured, secret, transport) {
  await page.goto(secured.url);
  const dialog = page.locator('#signin');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  const exp = Math.floor(Date.now() / 1000) + 15;
  await submitToken(dialog, jwt(secret, { sub: 'short-lived', exp, scope: 'read' }));
  await live(page);
  await page.locator('#connection-detail', { hasText: transport }).waitFor({ timeout: 5000 });
  return { dialog, exp };
}

/** A server with JWTs, and a page whose WebSocket is blocked (it goes over SSE): { secured, secret, page }. */
async function securedOverSse(t) {
  const secret = 'browser-test-jwt-secret-0123456789';
  const secured = await startSecured(t, { ORDERCAST_JWT_SECRET: secret });
  const page = await newTestPage(t);
  await page.routeWebSocket(/\/ws/, (ws) => ws.close({ code: 1011, reason: 'WebSocket blocked by the test' }));
  return { secured, secret, page };
}

test('over SSE, a token that expires opens the sign-in, and nothing after the expiry is shown', async (t) => {
  const { secured, secret, page } = await securedOverSse(t);
  const { dialog, exp } = await liveWithShortLivedToken(page, secured, secret, 'SSE');
  assert.equal(await dialog.isVisible(), false);
  const before = Number(await secured.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price)
    VALUES ('Before expiry', 'Clock', 1, 1) RETURNING id`));
  await row(page, before).waitFor({ timeout: 5000 });
  while (Date.now() / 1000 <= exp + 0.5) await sleep(200);
  // The stream is woken by a change, which an expired token may not see.
  const after = Number(await secured.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price)
    VALUES ('After expiry', 'Clock', 1, 1) RETURNING id`));
  await dialog.waitFor({ state: 'visible', timeout: 10000 });
  assert.equal(await row(page, after).count(), 0, 'the change after the expiry is not shown');
});

test('an SSE stream refused for an expired token waits while the sign-in is open', async (t) => {
  // Before, a stream refused with HTTP 401 (which EventSource does not
  // show) asked again with backoff, 1, 2, 4 s..., whatever the sign-in.
  const { secured, secret, page } = await securedOverSse(t);
  let streams = 0;
  page.on('request', (r) => {
    if (new URL(r.url()).pathname === '/api/events') streams += 1;
  });
  const { dialog, exp } = await liveWithShortLivedToken(page, secured, secret, 'SSE');
  while (Date.now() / 1000 <= exp + 0.5) await sleep(200);
  await secured.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('After expiry', 'Clock', 1, 1)`);
  await dialog.waitFor({ state: 'visible', timeout: 10000 });
  // Dismissed: the stream asks again, is refused with 401, and the sign-in
  // opens again; from then on, nothing until it is dismissed.
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  await dialog.waitFor({ state: 'visible', timeout: 15000 });
  await sleep(500);
  const refused = streams;
  await sleep(8000);
  assert.equal(streams, refused, 'no SSE stream asked for while the sign-in is open');
});

test('a WebSocket refused for an expired token waits while the sign-in is open, and asks again once it is dismissed', async (t) => {
  const secret = 'browser-test-jwt-secret-0123456789';
  const secured = new Ordercast(BIN, { ORDERCAST_JWT_SECRET: secret });
  // One context, two tabs: they share the sign-in's cookie.
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  t.cleanup = async () => {
    await context.close();
    await secured.cleanup();
  };
  await secured.start();
  const page = await context.newPage();
  t.page = page;
  page.setDefaultTimeout(10000);
  let opened = 0;
  await page.routeWebSocket(/\/ws/, (ws) => {
    opened += 1;
    ws.connectToServer();
  });
  const { dialog, exp } = await liveWithShortLivedToken(page, secured, secret, 'WebSocket');
  while (Date.now() / 1000 <= exp + 0.5) await sleep(200);
  // The stream is woken by a change, which an expired token may not see: closed with 4001.
  await secured.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price) VALUES ('After expiry', 'Clock', 1, 1)`);
  await dialog.waitFor({ state: 'visible', timeout: 10000 });
  const refused = opened;
  // Backoff alone would have asked three times by now (1, 2 and 4 s).
  await sleep(8000);
  assert.equal(opened, refused, 'no WebSocket opened while the sign-in is open');
  await page.keyboard.press('Escape');
  await until(() => opened > refused, 'a WebSocket opened once the sign-in was dismissed').catch(async () => {
    await sleep(10000);
    assert.ok(opened > refused, 'a WebSocket opened once the sign-in was dismissed');
  });
  // Refused again: the sign-in opens again. Signing in in another tab, then
  // coming back to this one, takes this one live too.
  await dialog.waitFor({ state: 'visible', timeout: 10000 });
  const other = await context.newPage();
  await other.goto(secured.url);
  await submitToken(other.locator('#signin'), jwt(secret, { sub: 'renewed', exp: exp + 3600, scope: 'read' }));
  await live(other);
  await page.evaluate(() => document.dispatchEvent(new Event('visibilitychange')));
  await live(page);
  assert.equal(await dialog.isVisible(), false);
  await other.close();
});

test('a WebSocket refused for the page\'s origin falls back to SSE, with no sign-in', async (t) => {
  // A proxy that rewrites Host, with no ORDERCAST_ALLOWED_ORIGINS: the
  // server closes with 4003 "origin not allowed". Before, the page took it
  // for a token's refusal: a sign-in on a server with no tokens, again and
  // again, never live.
  const { page } = await openDashboard(t, {
    before: (p) => p.routeWebSocket(/\/ws/, (ws) => ws.close({ code: 4003, reason: 'origin not allowed' })),
  });
  await page.locator('#connection-detail', { hasText: 'SSE' }).waitFor({ timeout: 5000 });
  assert.equal(await page.locator('#signin').isVisible(), false);
});

test('when WebSocket fails the page falls back to SSE', async (t) => {
  let attempts = 0;
  const { page } = await openDashboard(t, {
    before: (p) => p.routeWebSocket(/\/ws/, (ws) => {
      attempts += 1;
      ws.close({ code: 1011, reason: 'WebSocket blocked by the test' });
    }),
  });
  assert.ok(attempts >= 1, 'the page tried WebSocket first');
  await page.locator('#connection-detail', { hasText: 'SSE' }).waitFor({ timeout: 5000 });
  const id = await insertOrder({ customer: 'Over SSE' });
  await row(page, id).waitFor({ timeout: 5000 });
  await server.sql(`UPDATE orders SET status = 'failed' WHERE id = ${id}`);
  await row(page, id).locator('.badge', { hasText: 'Failed' }).waitFor({ timeout: 5000 });
});

test('over SSE, a stream silent for 40 s is taken as dead and opened again from its position', async (t) => {
  const opened = [];
  const { page } = await openDashboard(t, {
    before: async (p) => {
      // The page's clock can jump: 40 s of silence without waiting for them.
      await p.clock.install();
      await p.routeWebSocket(/\/ws/, (ws) => ws.close({ code: 1011, reason: 'WebSocket blocked by the test' }));
      p.on('request', (r) => {
        if (new URL(r.url()).pathname === '/api/events') opened.push(new URL(r.url()).searchParams.get('since'));
      });
    },
  });
  await page.locator('#connection-detail', { hasText: 'SSE' }).waitFor({ timeout: 5000 });
  const id = await insertOrder({ customer: 'Before the silence' });
  await row(page, id).waitFor({ timeout: 5000 });
  const streams = opened.length;
  // The server's heartbeats come every 15 s of real time: none arrives
  // while the page's clock jumps 45 s, as when a NAT forgot the connection.
  await page.clock.fastForward('00:45');
  await page.waitForFunction(() => document.querySelector('#connection').dataset.phase !== 'connected', null, { timeout: 5000 });
  await live(page);
  assert.ok(opened.length > streams, 'a new stream was opened');
  assert.ok(Number(opened.at(-1)) > Number(opened[0]), `the new stream resumes past the order shown (${opened})`);
  const after = await insertOrder({ customer: 'After the silence' });
  await row(page, after).waitFor({ timeout: 5000 });
});

test('a quiet WebSocket whose pings are answered stays open while the page\'s timers run once a minute', async (t) => {
  let sockets = 0;
  const { page } = await openDashboard(t, {
    before: async (p) => {
      await p.clock.install();
      p.on('websocket', () => {
        sockets += 1;
      });
    },
  });
  const opened = sockets;
  // As in a tab hidden for a while: each jump runs the page's ping timer
  // once; no change arrives, only the answers to the page's own pings.
  for (let i = 0; i < 4; i += 1) {
    await page.clock.fastForward('01:00');
    await sleep(500);
  }
  assert.equal(await page.locator('#connection').getAttribute('data-phase'), 'connected');
  assert.equal(sockets, opened, 'no WebSocket was opened again');
  const id = await insertOrder({ customer: 'After a quiet hour' });
  await row(page, id).waitFor({ timeout: 5000 });
});

test('a WebSocket whose ping goes unanswered is taken as dead and opened again from its position', async (t) => {
  const opened = [];
  let swallowPings = false;
  const { page } = await openDashboard(t, {
    before: async (p) => {
      await p.clock.install();
      await p.routeWebSocket(/\/ws/, (ws) => {
        opened.push(new URL(ws.url()).searchParams.get('since'));
        const upstream = ws.connectToServer();
        ws.onMessage((m) => {
          if (!(swallowPings && String(m).includes('"ping"'))) upstream.send(m);
        });
      });
    },
  });
  const id = await insertOrder({ customer: 'Before the dead path' });
  await row(page, id).waitFor({ timeout: 5000 });
  const sockets = opened.length;
  // The way to the server drops everything now: the next ping is never answered.
  swallowPings = true;
  await page.clock.fastForward('00:15');
  await sleep(300);
  await page.clock.fastForward('00:15');
  await page.waitForFunction(() => document.querySelector('#connection').dataset.phase !== 'connected', null, { timeout: 5000 });
  swallowPings = false;
  await page.clock.fastForward('00:02'); // the reconnect's pause
  await live(page);
  assert.ok(opened.length > sockets, 'a new WebSocket was opened');
  assert.ok(Number(opened.at(-1)) > Number(opened[0]), `the new WebSocket resumes past the order shown (${opened})`);
  const after = await insertOrder({ customer: 'After the dead path' });
  await row(page, after).waitFor({ timeout: 5000 });
});

/**
 * A proxy in front of the server that passes HTTP on (streams too) and holds
 * every WebSocket upgrade request without a word, as some proxies do.
 */
async function proxyHoldingUpgrades() {
  const upstream = new URL(server.url);
  const sockets = new Set();
  const proxy = http.createServer((req, res) => {
    const out = http.request(
      { host: upstream.hostname, port: upstream.port, path: req.url, method: req.method, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
      },
    );
    out.on('error', () => res.destroy());
    req.pipe(out);
  });
  let held = 0;
  proxy.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  proxy.on('upgrade', () => {
    held += 1; // never answered
  });
  const port = await freePort();
  await new Promise((ok) => proxy.listen(port, '127.0.0.1', ok));
  return {
    url: `http://127.0.0.1:${port}`,
    held: () => held,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise((ok) => proxy.close(ok));
    },
  };
}

test('a WebSocket whose handshake is never answered is given up, and the page goes live over SSE', async (t) => {
  const proxy = await proxyHoldingUpgrades();
  t.cleanup = () => proxy.close();
  const page = await browser.newPage({ viewport: { width: 1366, height: 900 } });
  t.page = page;
  await page.clock.install();
  await page.goto(proxy.url, { timeout: 15000 });
  await until(() => proxy.held() > 0, 'the WebSocket upgrade reached the proxy');
  await page.waitForFunction(() => document.querySelector('#connection').dataset.phase !== 'connected');
  await page.clock.fastForward('00:11');
  await page.locator('#connection-detail', { hasText: 'SSE' }).waitFor({ timeout: 5000 });
  await live(page);
  const id = await insertOrder({ customer: 'Past a proxy that holds upgrades' });
  await row(page, id).waitFor({ timeout: 5000 });
});

test('after falling back to SSE the page tries WebSocket again later, and goes on there exactly once', async (t) => {
  let refuse = true;
  const opened = [];
  const { page } = await openDashboard(t, {
    before: async (p) => {
      await p.clock.install();
      await p.routeWebSocket(/\/ws/, (ws) => {
        opened.push(new URL(ws.url()).searchParams.get('since'));
        // A refusal for now (a full server, say) looks to the page like a broken WebSocket.
        if (refuse) ws.close({ code: 1011, reason: 'WebSocket refused by the test, for now' });
        else ws.connectToServer();
      });
    },
  });
  await page.locator('#connection-detail', { hasText: 'SSE' }).waitFor({ timeout: 5000 });
  const id = await insertOrder({ customer: 'Over SSE for now' });
  await row(page, id).waitFor({ timeout: 5000 });
  refuse = false;
  const tries = opened.length;
  await page.clock.fastForward('01:01');
  await page.locator('#connection-detail', { hasText: 'WebSocket' }).waitFor({ timeout: 5000 });
  await live(page);
  assert.ok(opened.length > tries, 'WebSocket was tried again');
  assert.ok(Number(opened.at(-1)) > Number(opened[0]), `it resumes past the order shown over SSE (${opened})`);
  const after = await insertOrder({ customer: 'Back on WebSocket' });
  await row(page, after).waitFor({ timeout: 5000 });
  await server.sql(`UPDATE orders SET status = 'failed' WHERE id = ${id}`);
  await row(page, id).locator('.badge', { hasText: 'Failed' }).waitFor({ timeout: 5000 });
  const ids = await tableIds(page);
  assert.equal(ids.filter((x) => x === id).length, 1);
  assert.equal(ids.filter((x) => x === after).length, 1);
});

test('a killed server shows reconnecting, and rows written meanwhile appear exactly once', async (t) => {
  const { page } = await openDashboard(t);
  await page.evaluate(() => {
    globalThis.notReloaded = true;
  });
  const before = await insertOrder({ customer: 'Before the kill' });
  await row(page, before).waitFor({ timeout: 5000 });
  const oldPg = server.pgUrl;
  await server.kill();
  await page.locator('#connection[data-phase="reconnecting"]', { hasText: 'Reconnecting' }).waitFor({ timeout: 5000 });
  // A screen reader hears the phase once, not the countdown beside it.
  assert.equal(await page.locator('#connection [aria-live]').count(), 1);
  assert.equal(await page.locator('#connection [aria-live]').textContent(), 'Reconnecting');
  await page.screenshot({ path: join(SHOTS, 'reconnecting.png') });
  // ordercast is gone; its PostgreSQL is not. Write there while the page is cut off.
  const ids = (await psql(oldPg, `INSERT INTO orders (customer_name, product, quantity, unit_price)
      SELECT 'While down ' || g, 'Lantern', 1, 3 FROM generate_series(1, 5) g RETURNING id`)).split('\n').map(Number);
  await psql(oldPg, `UPDATE orders SET status = 'processing' WHERE id = ${before}`);
  assert.equal(await page.locator('#connection').getAttribute('data-phase'), 'reconnecting');
  await server.start(server.port);
  await live(page, 20000);
  for (const id of ids) await row(page, id).waitFor({ timeout: 5000 });
  await row(page, before).locator('.badge', { hasText: 'Processing' }).waitFor({ timeout: 5000 });
  await sleep(500);
  const shown = await tableIds(page);
  for (const id of ids) assert.equal(shown.filter((x) => x === id).length, 1, `order ${id} shown once`);
  const feed = await page.$$eval('#activity-list li', (lis) => lis.map((li) => li.textContent));
  for (const id of ids) {
    assert.equal(feed.filter((s) => new RegExp(`created #${id}\\b`).test(s)).length, 1, `order ${id} in the feed once`);
  }
  assert.equal(feed.filter((s) => new RegExp(`updated #${before}\\b`).test(s)).length, 1);
  assert.equal(await page.evaluate(() => globalThis.notReloaded), true, 'resumed without reloading the page');
});

test('a resume from a position the server no longer has resyncs and reloads', async (t) => {
  const { page } = await openDashboard(t);
  await page.evaluate(() => {
    globalThis.notReloaded = true;
  });
  const oldPg = server.pgUrl;
  await server.kill();
  await page.locator('#connection[data-phase="reconnecting"]').waitFor({ timeout: 5000 });
  // Two transactions: retention prunes a transaction whole or not at all.
  const insert = async (from, to) => (await psql(oldPg, `INSERT INTO orders (customer_name, product, quantity, unit_price)
      SELECT 'After the gap ' || g, 'Compass', 1, 7 FROM generate_series(${from}, ${to}) g RETURNING id`)).split('\n').map(Number);
  const ids = [...(await insert(1, 25)), ...(await insert(26, 30))];
  // What retention does after a while: the changes the page has not seen are gone
  // (all of the first transaction's).
  await psql(oldPg, 'SELECT change_prune(change_head() - 5)');
  await server.start(server.port);
  await page.locator('.toast', { hasText: 'the orders were reloaded' }).waitFor({ timeout: 20000 });
  await live(page, 5000);
  const shown = await tableIds(page);
  assert.deepEqual(shown.slice(0, 30), [...ids].reverse(), 'the reloaded page has every order');
  assert.equal(new Set(shown).size, shown.length, 'no order twice');
  const id = await insertOrder({ customer: 'After the resync' });
  await row(page, id).waitFor({ timeout: 5000 });
  assert.equal(await page.evaluate(() => globalThis.notReloaded), true, 'resynced without reloading the page');
});

test('a resume from a position ahead of the server\'s log (a restored database) resyncs and reloads', async (t) => {
  const { page } = await openDashboard(t);
  await page.evaluate(() => {
    globalThis.notReloaded = true;
  });
  const position = Number((await page.locator('#connection-detail').textContent()).replace(/\D/g, ''));
  const port = server.port;
  await server.kill();
  await page.locator('#connection[data-phase="reconnecting"]').waitFor({ timeout: 5000 });
  // The first reload fails (the database still coming up, say): the page must try again, not resume.
  let failed = 0;
  await page.route(/\/api\/orders\?/, (route) => {
    if (failed++) return route.continue();
    return route.fulfill({
      status: 503, contentType: 'application/problem+json',
      body: JSON.stringify({ status: 503, code: 'database_unavailable', message: 'the database is unavailable' }),
    });
  });
  // Another database behind the same address, its log shorter than what the page has seen.
  const restored = new Ordercast(BIN);
  t.cleanup = async () => {
    await restored.cleanup();
    if (!server.proc || server.proc.exitCode != null || server.proc.signalCode != null) await server.start(port);
  };
  await restored.start(port);
  const head = Number(await restored.sql('SELECT change_head()'));
  assert.ok(head < position, `the restored log (${head}) is behind the page (${position})`);
  await page.locator('.toast', { hasText: 'the orders were reloaded' }).waitFor({ timeout: 30000 });
  assert.ok(failed >= 2, 'the reload was refused once, then tried again');
  await live(page, 5000);
  const expected = (await restored.sql('SELECT id FROM orders ORDER BY id DESC LIMIT 50')).split('\n').filter(Boolean).map(Number);
  assert.deepEqual(await tableIds(page), expected, 'the page shows the restored database\'s orders');
  const id = Number(await restored.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price)
    VALUES ('After the restore', 'Map', 1, 1) RETURNING id`));
  await row(page, id).waitFor({ timeout: 5000 });
  await sleep(1500);
  assert.equal(await page.locator('.toast', { hasText: 'consistent page' }).count(), 0, 'the reload succeeded at once');
  assert.equal(await page.locator('#connection').getAttribute('data-phase'), 'connected');
  assert.equal(await page.evaluate(() => globalThis.notReloaded), true, 'resynced without reloading the page');
});

test('the order detail follows its order again after its stream was refused', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Refused Follower', product: 'Sextant' });
  await row(page, id).waitFor({ timeout: 5000 });
  let refuse = false;
  let refused = 0;
  await page.route(new RegExp(`/api/orders/${id}/events`), (route) => {
    if (!refuse) return route.continue();
    refuse = false;
    refused += 1;
    return route.fulfill({
      status: 503, contentType: 'application/problem+json', headers: { 'Retry-After': '1' },
      body: JSON.stringify({ status: 503, code: 'shutting_down', message: 'the server is stopping' }),
    });
  });
  const dialog = await openDetail(page, id);
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Pending' }).waitFor({ timeout: 5000 });
  // The server goes away; the browser's own reconnect is refused, as by a server that is stopping.
  refuse = true;
  await server.kill();
  await within(15000, 'the refused reconnect', (async () => {
    while (!refused) await sleep(50);
  })());
  const again = page.waitForResponse((r) => r.url().includes(`/api/orders/${id}/events`) && r.status() === 200,
    { timeout: 30000 });
  await server.start(server.port);
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Processing' }).waitFor({ timeout: 20000 });
  await again;
  await server.sql(`UPDATE orders SET status = 'processed' WHERE id = ${id}`);
  await dialog.locator('#detail-changes li', { hasText: 'sql:postgres' }).waitFor({ timeout: 5000 });
  await dialog.locator('#detail-fields dd .badge', { hasText: 'Processed' }).waitFor({ timeout: 5000 });
});

test('when WebSocket fails while the Kafka ingest is degraded (health 503), the page still falls back to SSE', async (t) => {
  const { page } = await openDashboard(t, {
    before: async (p) => {
      // Health is 503 for a part that streams do not need.
      await p.route('**/api/health', (route) => route.fulfill({
        status: 503, contentType: 'application/json',
        body: JSON.stringify({ status: 'degraded', database: { ok: true }, listener: { ok: true, connected: true },
          kafka: { enabled: true, healthy: false, state: 'degraded' } }),
      }));
      await p.routeWebSocket(/\/ws/, (ws) => ws.close({ code: 1011, reason: 'WebSocket blocked by the test' }));
    },
  });
  await page.locator('#connection-detail', { hasText: 'SSE' }).waitFor({ timeout: 5000 });
  const id = await insertOrder({ customer: 'Over SSE, ingest degraded' });
  await row(page, id).waitFor({ timeout: 5000 });
});

test('when WebSocket fails and a proxy with no server behind it answers health, WebSocket is tried again, not SSE', async (t) => {
  const page = await newTestPage(t);
  let sockets = 0;
  let streams = 0;
  await page.route('**/api/health', (route) => route.fulfill({ status: 502, contentType: 'text/html', body: '<h1>Bad Gateway</h1>' }));
  await page.routeWebSocket(/\/ws/, (ws) => {
    sockets += 1;
    ws.close({ code: 1011, reason: 'WebSocket blocked by the test' });
  });
  page.on('request', (r) => {
    if (new URL(r.url()).pathname === '/api/events') streams += 1;
  });
  await page.goto(server.url, { timeout: 15000 });
  await until(() => sockets >= 2, 'a second WebSocket try');
  assert.equal(streams, 0, 'no SSE stream was opened');
});

test('a WebSocket cut right after ready is opened again with growing pauses, not every second', async (t) => {
  let sockets = 0;
  await openDashboard(t, {
    before: (p) => p.routeWebSocket(/\/ws/, (ws) => {
      sockets += 1;
      const upstream = ws.connectToServer();
      ws.onMessage((m) => upstream.send(m));
      upstream.onMessage((m) => {
        ws.send(m);
        // Through the handshake and `ready`, then cut, as by a proxy that
        // ends the connections it lets through.
        if (JSON.parse(m).type === 'ready') setTimeout(() => ws.close({ code: 1011, reason: 'cut by the test' }), 300);
      });
    }),
  });
  const start = sockets;
  await sleep(15000);
  // 1, 2, 4, 8 s apart: about 4 in 15 s; a pause of 1 s each time, about 12.
  assert.ok(sockets - start <= 6, `${sockets - start} WebSockets in 15 s`);
});

test('the order detail whose stream went silent, or whose action met a newer version, reads its order again', async (t) => {
  const { page } = await openDashboard(t, { before: (p) => p.clock.install() });
  const id = await insertOrder({ customer: 'Silent Follower', product: 'Astrolabe' });
  await row(page, id).waitFor({ timeout: 5000 });
  const order = await (await fetch(`${server.url}/api/orders/${id}`)).json();
  // The detail's stream answers once, then says nothing: EventSource waits
  // ten minutes before it tries again, as a connection a NAT forgot.
  let silent = true;
  await page.route(new RegExp(`/api/orders/${id}/events`), (route) => {
    if (!silent) return route.continue();
    const snapshot = { type: 'snapshot', seq: 1, orders: [order], last: true, truncated: false };
    return route.fulfill({
      status: 200, contentType: 'text/event-stream',
      body: `retry: 600000\n\nevent: snapshot\ndata: ${JSON.stringify(snapshot)}\n\nevent: ready\ndata: {"type":"ready","seq":1}\n\n`,
    });
  });
  await row(page, id).locator('button').click();
  const dialog = page.locator('#detail');
  const badge = (status) => dialog.locator('#detail-fields dd .badge', { hasText: status });
  await badge('Pending').waitFor({ timeout: 5000 });
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await row(page, id).locator('.badge', { hasText: 'Processing' }).waitFor({ timeout: 5000 });
  // The dialog still shows version 1: its cancel is refused (412), and the
  // order is read again, so the next try sends the version it has now.
  await dialog.locator('#detail-cancel').click();
  await page.locator('.toast', { hasText: `Could not cancel order #${id}` }).waitFor({ timeout: 5000 });
  await badge('Processing').waitFor({ timeout: 5000 });
  // Still silent: a change the dialog is not told of, until the silence
  // (no heartbeat for 40 s) makes it read the order again.
  await server.sql(`UPDATE orders SET status = 'processed' WHERE id = ${id}`);
  await row(page, id).locator('.badge', { hasText: 'Processed' }).waitFor({ timeout: 5000 });
  silent = false;
  await page.clock.fastForward('01:00');
  await badge('Processed').waitFor({ timeout: 5000 });
  await server.sql(`UPDATE orders SET status = 'shipped' WHERE id = ${id}`);
  await badge('Shipped').waitFor({ timeout: 5000 });
});

test('the order detail offers no action before its order has loaded', async (t) => {
  const { page, errors } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Never Loaded' });
  await row(page, id).waitFor({ timeout: 5000 });
  await page.route(new RegExp(`/api/orders/${id}(/events)?$`), (route) => route.fulfill({
    status: 503, contentType: 'application/problem+json', headers: { 'Retry-After': '30' },
    body: JSON.stringify({ status: 503, code: 'database_unavailable', message: 'the database is unavailable' }),
  }));
  await row(page, id).locator('button').click();
  await page.locator('.toast', { hasText: 'the database is unavailable' }).first().waitFor({ timeout: 5000 });
  const dialog = page.locator('#detail');
  for (const button of ['#detail-cancel', '#detail-delete', '#status-form']) {
    assert.equal(await dialog.locator(button).isVisible(), false, `${button} is hidden`);
  }
  assert.deepEqual(errors.filter((e) => e.startsWith('uncaught')), []);
});

test('an action is sent once however often its button is clicked while it is on its way', async (t) => {
  const { page, errors } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Double Clicker', product: 'Metronome' });
  const action = new RegExp(`/api/orders/${id}(/cancel)?$`);
  const sent = [];
  page.on('request', (r) => {
    if (action.test(r.url()) && r.method() !== 'GET') sent.push(r.method());
  });
  // Every action takes half a second to arrive.
  await page.route(action, async (route) => {
    if (route.request().method() !== 'GET') await sleep(500);
    return route.continue();
  });
  const dialog = await openDetail(page, id);
  await dialog.locator('#status-select option[value="processing"]').waitFor({ state: 'attached' });
  await dialog.locator('#status-select').selectOption('processing');
  await dialog.getByRole('button', { name: 'Apply' }).dblclick();
  await page.locator('.toast-ok', { hasText: `Order #${id} is now Processing` }).waitFor({ timeout: 5000 });
  await dialog.getByRole('button', { name: 'Cancel order' }).dblclick();
  await page.locator('.toast-ok', { hasText: `Order #${id} cancelled` }).waitFor({ timeout: 5000 });
  await dialog.getByRole('button', { name: 'Delete…' }).click();
  await dialog.getByRole('button', { name: 'Yes, delete' }).dblclick();
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  await sleep(1000);
  assert.deepEqual(sent, ['PATCH', 'POST', 'DELETE'], 'one request per action');
  assert.equal(await page.locator('.toast-error').count(), 0, 'no error after the success');
  assert.equal(await server.sql(`SELECT count(*) FROM orders WHERE id = ${id}`), '0');
  assert.deepEqual(errors.filter((e) => e.startsWith('uncaught')), []);
});

test('an action that failed can be sent again, and its button keeps the keyboard focus', async (t) => {
  const { page } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Second Try', product: 'Sundial' });
  let refuse = true;
  await page.route(`**/api/orders/${id}`, async (route) => {
    if (route.request().method() !== 'PATCH' || !refuse) return route.continue();
    refuse = false;
    await sleep(300);
    return route.fulfill({ status: 503, contentType: 'application/problem+json',
      body: JSON.stringify({ status: 503, code: 'database_unavailable', message: 'the database is unavailable' }) });
  });
  const dialog = await openDetail(page, id);
  await dialog.locator('#status-select option[value="processing"]').waitFor({ state: 'attached' });
  await dialog.locator('#status-select').selectOption('processing');
  const apply = dialog.getByRole('button', { name: 'Apply' });
  await apply.focus();
  await page.keyboard.press('Enter');
  await page.locator('.toast-error', { hasText: `Could not update order #${id}` }).waitFor({ timeout: 5000 });
  assert.equal(await apply.isDisabled(), false, 'Apply is enabled again');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Apply', 'the focus is back on Apply');
  await page.keyboard.press('Enter');
  await page.locator('.toast-ok', { hasText: `Order #${id} is now Processing` }).waitFor({ timeout: 5000 });
  assert.equal(await server.sql(`SELECT status FROM orders WHERE id = ${id}`), 'processing');
});

test('the order detail whose actions or history could not be read says so and reads them again', async (t) => {
  const { page, errors } = await openDashboard(t);
  const id = await insertOrder({ customer: 'Actions Later', product: 'Quadrant' });
  await row(page, id).waitFor({ timeout: 5000 });
  const unavailable = (route) => route.fulfill({ status: 503, contentType: 'application/problem+json',
    body: JSON.stringify({ status: 503, code: 'database_unavailable', message: 'the database is unavailable' }) });
  // The state machine cannot be read twice: when the order is read, and
  // again when its stream's snapshot shows it.
  let transitionsAsked = 0;
  await page.route('**/api/transitions', (route) => {
    transitionsAsked += 1;
    return transitionsAsked <= 2 ? unavailable(route) : route.continue();
  });
  const dialog = await openDetail(page, id);
  // Asked again after a pause: the actions come without a change to the
  // order, and the failure was said.
  await dialog.locator('#status-form').waitFor({ state: 'visible', timeout: 8000 });
  await page.locator('.toast-error', { hasText: `Could not load the actions for order #${id}` }).waitFor({ timeout: 5000 });
  assert.equal(await dialog.getByRole('button', { name: 'Cancel order' }).isVisible(), true);
  assert.equal(await dialog.getByRole('button', { name: 'Delete…' }).isVisible(), true);
  assert.equal(transitionsAsked, 3);
  // The history read again after a change fails once: said, and read again.
  await dialog.locator('#detail-history li', { hasText: 'Created as' }).waitFor();
  let historyAsked = 0;
  await page.route(`**/api/orders/${id}/history`, (route) => {
    historyAsked += 1;
    return historyAsked === 1 ? unavailable(route) : route.continue();
  });
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await page.locator('.toast-error', { hasText: `Could not load the history of order #${id}` }).waitFor({ timeout: 5000 });
  await dialog.locator('#detail-history li', { hasText: /Pending\s*→\s*Processing/ }).waitFor({ timeout: 5000 });
  assert.equal(historyAsked, 2);
  assert.deepEqual(errors.filter((e) => e.startsWith('uncaught')), []);
});

test('an order with a time of infinity is shown in the table and in the detail', async (t) => {
  const { page, errors } = await openDashboard(t);
  const id = Number(await server.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price, created_at)
    VALUES ('Forever Customer', 'Perpetuum', 1, 2, 'infinity') RETURNING id`));
  await server.sql(`UPDATE orders SET status = 'processing' WHERE id = ${id}`);
  await server.sql(`UPDATE orders SET shipped_at = 'infinity', processed_at = '-infinity' WHERE id = ${id}`);
  await row(page, id).waitFor({ timeout: 5000 });
  assert.match(await row(page, id).textContent(), /Forever Customer/);
  const dialog = await openDetail(page, id);
  const field = (name) => dialog.locator('#detail-fields dt', { hasText: new RegExp(`^${name}$`) }).locator('xpath=following-sibling::dd[1]');
  await field('Shipped').waitFor({ timeout: 5000 });
  assert.equal(await field('Created').textContent(), 'infinity');
  assert.equal(await field('Shipped').textContent(), 'infinity');
  assert.equal(await field('Processed').textContent(), '-infinity');
  assert.match(await field('Processing since').textContent(), /\d{4}/);
  await dialog.locator('#detail-history li', { hasText: /Pending\s*→\s*Processing/ }).waitFor({ timeout: 5000 });
  await dialog.locator('#status-select option').first().waitFor({ state: 'attached' });
  // Live changes to it are shown too.
  await server.sql(`UPDATE orders SET customer_email = 'forever@example.com' WHERE id = ${id}`);
  await field('Email').filter({ hasText: 'forever@example.com' }).waitFor({ timeout: 5000 });
  assert.equal(await page.locator('.toast-error').count(), 0, 'no error');
  assert.deepEqual(errors, []);
});

test('a create answered after the form was closed and opened again leaves the new form alone', async (t) => {
  const { page } = await openDashboard(t);
  await page.route('**/api/orders', async (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    await sleep(1500);
    return route.continue();
  });
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await fillOrder(dialog, { 'Customer name': 'First order', Product: 'Compass', Quantity: '1', 'Unit price': '5' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await page.keyboard.press('Escape');
  await dialog.waitFor({ state: 'hidden' });
  await page.getByRole('button', { name: 'New order' }).click();
  await dialog.getByLabel('Customer name').fill('Second order');
  const firstToast = page.locator('.toast', { hasText: /Order #\d+ created/ });
  await firstToast.waitFor({ timeout: 5000 });
  const first = await firstToast.first().textContent();
  assert.equal(await dialog.isVisible(), true, 'the reopened form stays open');
  assert.equal(await dialog.getByLabel('Customer name').inputValue(), 'Second order');
  // Opened again only to look, unchanged: cleared once the create is done,
  // so one click does not create it twice.
  await dialog.getByLabel('Customer name').fill('Third order');
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await page.keyboard.press('Escape');
  await page.getByRole('button', { name: 'New order' }).click();
  // The second create's own toast (the first's may be gone by now).
  await page.locator('.toast', { hasText: /Order #\d+ created/ }).filter({ hasNotText: first }).waitFor({ timeout: 5000 });
  assert.equal(await dialog.isVisible(), true);
  assert.equal(await dialog.getByLabel('Customer name').inputValue(), '');
});

test('an open create form is filled in again after the page reloads (as signing in again does)', async (t) => {
  const { page } = await openDashboard(t);
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await dialog.getByLabel('Customer name').fill('Half Typed');
  await dialog.getByLabel('Product').fill('Barometer');
  await page.reload();
  await live(page);
  assert.equal(await dialog.isVisible(), false, 'not opened by itself');
  await page.getByRole('button', { name: 'New order' }).click();
  assert.equal(await dialog.getByLabel('Customer name').inputValue(), 'Half Typed');
  assert.equal(await dialog.getByLabel('Product').inputValue(), 'Barometer');
  // Once: closed, and reloaded again, the form is empty.
  await page.keyboard.press('Escape');
  await page.reload();
  await live(page);
  await page.getByRole('button', { name: 'New order' }).click();
  assert.equal(await dialog.getByLabel('Customer name').inputValue(), '');
});

test('a create the server does not answer in time says the order may have been created', async (t) => {
  const { page } = await openDashboard(t, { before: (p) => p.clock.install() });
  await page.route('**/api/orders', (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    return undefined; // never answered
  });
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await fillOrder(dialog, { 'Customer name': 'Unanswered', Product: 'Hourglass', Quantity: '1', 'Unit price': '3' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await page.clock.fastForward('00:16');
  await page.locator('.toast', { hasText: 'may have been created' }).waitFor({ timeout: 5000 });
});

test('a create whose answer was lost, sent again, makes one order and says it was made', async (t) => {
  const { page, errors } = await openDashboard(t);
  // The first create of each draft reaches the server and commits; its
  // answer is lost on the way back: the connection drops, then a proxy
  // gives up waiting (504).
  let posts = 0;
  let lose = 'connectionreset';
  await page.route('**/api/orders', async (route) => {
    if (route.request().method() !== 'POST') return route.continue();
    posts += 1;
    if (!lose) return route.continue();
    const how = lose;
    lose = null;
    await route.fetch();
    if (how === '504') return route.fulfill({ status: 504, contentType: 'text/html', body: '<h1>504 Gateway Time-out</h1>' });
    return route.abort(how);
  });
  const dialog = page.locator('#create');
  const made = (customer) => server.sql(`SELECT count(*) FROM orders WHERE customer_name = ${sqlStr(customer)}`);
  for (const [customer, lost] of [['Lost Answer', 'connection was lost'], ['Gateway Timeout', 'proxy answered 504']]) {
    posts = 0;
    await page.getByRole('button', { name: 'New order' }).click();
    await fillOrder(dialog, { 'Customer name': customer, Product: 'Sextant', Quantity: '1', 'Unit price': '7' });
    await dialog.getByRole('button', { name: 'Create order' }).click();
    await page.locator('.toast-error', { hasText: lost }).filter({ hasText: 'may have been created' }).waitFor({ timeout: 5000 });
    assert.equal(await made(customer), '1', 'the first try was done');
    assert.equal(await dialog.isVisible(), true, 'the form stays open with what was typed');
    // Clicked again: the same draft, the same external id, no second order.
    // Read while it is shown (a few seconds), then checked against the
    // database; the last try's toast may still be on screen.
    const said = page.locator('.toast-ok', { hasText: /Order #\d+ was already created/ });
    const shown = await said.allTextContents();
    await dialog.getByRole('button', { name: 'Create order' }).click();
    let saidText;
    for (const deadline = Date.now() + 5000; !saidText; await sleep(20)) {
      assert.ok(Date.now() < deadline, 'no toast said the order was made');
      saidText = (await said.allTextContents()).find((text) => !shown.includes(text));
    }
    await dialog.waitFor({ state: 'hidden', timeout: 5000 });
    assert.equal(posts, 2);
    assert.equal(await made(customer), '1', 'one order, not two');
    const id = Number(await server.sql(`SELECT id FROM orders WHERE customer_name = ${sqlStr(customer)}`));
    assert.ok(saidText.includes(`Order #${id} was already created`), saidText);
    assert.match(await server.sql(`SELECT external_id FROM orders WHERE id = ${id}`), /^dashboard-[0-9a-f-]{32,36}$/);
    lose = '504';
  }
  // A new draft is another order, with an id of its own.
  lose = null;
  await page.getByRole('button', { name: 'New order' }).click();
  assert.equal(await dialog.getByLabel('Customer name').inputValue(), '', 'the form was emptied');
  await fillOrder(dialog, { 'Customer name': 'Lost Answer', Product: 'Octant', Quantity: '1', 'Unit price': '7' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  assert.equal(await made('Lost Answer'), '2');
  assert.equal(await server.sql(`SELECT count(DISTINCT external_id) FROM orders WHERE customer_name = 'Lost Answer'`), '2');
  // Changed after its answer was lost, the draft is another order: the user
  // is told of the one made, and the next click makes this one.
  lose = 'connectionreset';
  await page.getByRole('button', { name: 'New order' }).click();
  await fillOrder(dialog, { 'Customer name': 'Changed Draft', Product: 'Sextant', Quantity: '1', 'Unit price': '7' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  // (The same words on screen from before are not said again.)
  await page.locator('.toast-error', { hasText: 'connection was lost' }).waitFor({ timeout: 5000 });
  await dialog.locator('[type=submit]:not([disabled])').waitFor({ timeout: 5000 });
  assert.equal(await made('Changed Draft'), '1');
  await fillOrder(dialog, { Quantity: '2' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  const told = page.locator('.toast', { hasText: /Order #\d+ was already created by an earlier try, with the values the form had then/ });
  await told.waitFor({ timeout: 5000 });
  const toldText = await told.first().textContent();
  const first = Number(await server.sql(`SELECT id FROM orders WHERE customer_name = 'Changed Draft'`));
  assert.ok(toldText.includes(`Order #${first} was already created`), toldText);
  assert.equal(await dialog.isVisible(), true, 'the changed form stays open');
  assert.equal(await made('Changed Draft'), '1');
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  assert.equal(await server.sql(`SELECT string_agg(quantity::text, ',' ORDER BY id) FROM orders WHERE customer_name = 'Changed Draft'`), '1,2');
  // The same when the order made cannot be read back (the search fails):
  // the draft is told apart by what its first try sent, and the changed
  // one is not taken for made.
  await page.route(/\/api\/orders\?.*q=dashboard-/, (route) => route.abort('connectionreset'));
  lose = 'connectionreset';
  await page.getByRole('button', { name: 'New order' }).click();
  await fillOrder(dialog, { 'Customer name': 'Unread Draft', Product: 'Sextant', Quantity: '1', 'Unit price': '7' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.locator('[type=submit]:not([disabled])').waitFor({ timeout: 5000 });
  assert.equal(await made('Unread Draft'), '1');
  await fillOrder(dialog, { Quantity: '3' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await page.locator('.toast', { hasText: 'An order was already created by an earlier try, with the values the form had then' })
    .waitFor({ timeout: 5000 });
  assert.equal(await dialog.isVisible(), true, 'the changed form stays open');
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  assert.equal(await server.sql(`SELECT string_agg(quantity::text, ',' ORDER BY id) FROM orders WHERE customer_name = 'Unread Draft'`), '1,3');
  // Not changed, it is taken for made.
  lose = 'connectionreset';
  await page.getByRole('button', { name: 'New order' }).click();
  await fillOrder(dialog, { 'Customer name': 'Unread Same', Product: 'Sextant', Quantity: '1', 'Unit price': '7' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.locator('[type=submit]:not([disabled])').waitFor({ timeout: 5000 });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await page.locator('.toast-ok', { hasText: 'The order was already created by the earlier try' }).waitFor({ timeout: 5000 });
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
  assert.equal(await made('Unread Same'), '1');
  assert.deepEqual(errors.filter((e) => e.startsWith('uncaught')), []);
});

test('a quantity written as a JSON number ("2.0", "1e1") is sent as that number', async (t) => {
  const { page } = await openDashboard(t);
  const dialog = page.locator('#create');
  for (const [customer, quantity, expected] of [['Decimal Quantity', '2.0', '2|6.50'], ['Exponent Quantity', '1e1', '10|32.50']]) {
    await page.getByRole('button', { name: 'New order' }).click();
    await fillOrder(dialog, { 'Customer name': customer, Product: 'Abacus', Quantity: quantity, 'Unit price': '3.25' });
    await dialog.getByRole('button', { name: 'Create order' }).click();
    await dialog.waitFor({ state: 'hidden', timeout: 5000 });
    assert.equal(await server.sql(`SELECT quantity || '|' || amount FROM orders WHERE customer_name = ${sqlStr(customer)}`), expected);
  }
  // What is not a whole number still gets the server's word for it.
  await page.getByRole('button', { name: 'New order' }).click();
  await fillOrder(dialog, { 'Customer name': 'Half Quantity', Product: 'Abacus', Quantity: '2.5', 'Unit price': '3.25' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  await dialog.locator('#e-quantity', { hasText: /./ }).waitFor({ timeout: 5000 });
  assert.equal(await server.sql(`SELECT count(*) FROM orders WHERE customer_name = 'Half Quantity'`), '0');
});

test('a field error is announced when Enter is pressed in that field, and said once when the focus moves to it', async (t) => {
  const { page } = await openDashboard(t);
  await page.getByRole('button', { name: 'New order' }).click();
  const dialog = page.locator('#create');
  await fillOrder(dialog, { 'Customer name': 'Screen Reader', Product: 'Braille display', Quantity: '1', 'Unit price': 'abc' });
  await dialog.getByLabel('Unit price').press('Enter');
  const error = dialog.locator('#e-unit_price');
  await error.filter({ hasText: /./ }).waitFor({ timeout: 5000 });
  const message = await error.textContent();
  // Which live regions hold the message (a screen reader says what comes into them).
  const saidBy = (text) => page.evaluate((m) => [...document.querySelectorAll('[role=alert], [aria-live]')]
    .filter((n) => n.getAttribute('aria-live') !== 'off' && n.textContent.includes(m)).map((n) => n.id), text);
  assert.equal((await saidBy(message)).length, 1, `"${message}" is in one live region`);
  assert.equal(await page.evaluate(() => document.activeElement.id), 'f-unit_price');
  // Sent with the button: the focus moves to the field, which is described
  // by its error; no live region says it a second time.
  await fillOrder(dialog, { 'Unit price': '5', Quantity: '0' });
  await dialog.getByRole('button', { name: 'Create order' }).click();
  const quantityError = dialog.locator('#e-quantity');
  await quantityError.filter({ hasText: /./ }).waitFor({ timeout: 5000 });
  assert.equal(await page.evaluate(() => document.activeElement.id), 'f-quantity');
  assert.deepEqual(await saidBy(await quantityError.textContent()), []);
  assert.equal(await dialog.getByLabel('Quantity').getAttribute('aria-describedby'), 'e-quantity');
});

test('the page stays responsive with 100,000 orders and 500 changes per second', async (t) => {
  let t0 = Date.now();
  await server.sql(`INSERT INTO orders (customer_name, product, quantity, unit_price, status)
    SELECT 'Bulk customer ' || (g % 5000), 'Bulk product ' || (g % 40), 1 + g % 5, 1 + (g % 1000) / 10.0,
           (ARRAY['pending','processing','processed','shipped','delivered','cancelled','failed'])[1 + g % 7]
    FROM generate_series(1, 100000) g`, { timeoutMs: 180000 });
  figure(`100,000 orders inserted in one statement: ${Date.now() - t0} ms`);
  // The server streams those 100,000 changes first (to nobody); the burst
  // below is about the page, so it starts once the server has caught up.
  t0 = Date.now();
  const bulkHead = Number(await server.sql('SELECT change_head()'));
  await within(120000, 'the server to stream the bulk insert', (async () => {
    while ((await (await fetch(`${server.url}/api/health`)).json()).hub.position < bulkHead) await sleep(250);
  })());
  figure(`server streamed the 100,000 changes ${Date.now() - t0} ms after the commit`);
  t0 = Date.now();
  const { page } = await openDashboard(t);
  await page.locator('#orders-body tr').first().waitFor();
  figure(`page load to live with ${Number(await server.sql('SELECT count(*) FROM orders')).toLocaleString('en-US')} orders: ${Date.now() - t0} ms`);
  await page.evaluate(() => {
    const m = { longTasks: 0, longestTask: 0, worstFrame: 0 };
    globalThis.monitor = m;
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) {
        m.longTasks += 1;
        m.longestTask = Math.max(m.longestTask, e.duration);
      }
    }).observe({ type: 'longtask' });
    let last = performance.now();
    const frame = (now) => {
      m.worstFrame = Math.max(m.worstFrame, now - last);
      last = now;
      if (!m.stop) requestAnimationFrame(frame);
    };
    requestAnimationFrame(frame);
  });
  const seconds = 5;
  const headBefore = Number(await server.sql('SELECT change_head()'));
  // 10 new orders and 2 status changes every 20 ms: 500 inserts + 100 updates a second.
  const writer = server.sql(`DO $$
    DECLARE t0 timestamptz := clock_timestamp(); i int := 0;
    BEGIN
      WHILE clock_timestamp() < t0 + interval '${seconds} seconds' LOOP
        INSERT INTO orders (customer_name, product, quantity, unit_price)
          SELECT 'Burst ' || (i * 10 + g), 'Burst product', 1, 9.99 FROM generate_series(1, 10) g;
        UPDATE orders SET status = 'processing'
          WHERE id IN (SELECT id FROM orders WHERE status = 'pending' ORDER BY id DESC LIMIT 2);
        COMMIT;
        i := i + 1;
        PERFORM pg_sleep(GREATEST(0, extract(epoch FROM t0 + i * interval '20 milliseconds' - clock_timestamp())));
      END LOOP;
    END $$`, { timeoutMs: 60000 });
  await sleep(1500);
  // Measured in the page, from the click to the frame that shows the
  // filtered rows (Playwright's own click round trip is not the page's).
  for (const status of ['pending', 'all']) {
    const ms = await page.evaluate((st) => new Promise((resolve, reject) => {
      const t0 = performance.now();
      const tab = document.getElementById(`tab-${st}`);
      tab.click();
      const check = () => {
        const rows = [...document.querySelectorAll('#orders-body tr')];
        const done = tab.getAttribute('aria-selected') === 'true' &&
          (st === 'all' ? rows.length === 50 : rows.length > 0 && rows.every((r) => r.dataset.status === st));
        if (done) resolve(Math.round(performance.now() - t0));
        else if (performance.now() - t0 > 5000) reject(new Error(`"${st}" not applied after 5 s`));
        else requestAnimationFrame(check);
      };
      requestAnimationFrame(check);
    }), status);
    const fetchMs = await page.evaluate(() => {
      const e = performance.getEntriesByType('resource').filter((r) => r.name.includes('/api/orders?')).pop();
      return Math.round(e.responseEnd - e.startTime);
    });
    figure(`during the burst, "${status}" tab click -> filtered rows painted: ${ms} ms ` +
      `(loaded rows are filtered at once; the reload, GET /api/orders, took ${fetchMs} ms)`);
    // (The same main-thread stall the worst frame gap allows up to 2 s.)
    assert.ok(ms < 2000, `the "${status}" tab took effect within two seconds (${ms} ms)`);
    await sleep(700);
  }
  await writer;
  const head = Number(await server.sql('SELECT change_head()'));
  const inserted = Number(await server.sql(`SELECT count(*) FROM orders WHERE customer_name LIKE 'Burst %'`));
  figure(`burst: ${inserted} inserts + ${head - headBefore - inserted} updates in ${seconds} s ` +
    `(${Math.round((head - headBefore) / seconds)} changes/s)`);
  const caughtUp = Date.now();
  await page.waitForFunction((h) => {
    const text = document.getElementById('connection-detail').textContent.replace(/\D/g, '');
    return Number(text) >= h;
  }, head, { timeout: 5000 });
  figure(`page caught up with the last change ${Date.now() - caughtUp} ms after the writer finished`);
  const maxId = Number(await server.sql('SELECT max(id) FROM orders'));
  await page.waitForFunction((m) => Number(document.querySelector('#orders-body tr')?.dataset.id) === m, maxId, { timeout: 5000 });
  const ids = await tableIds(page);
  assert.equal(ids.length, 50, 'one page of rows');
  const expected = (await server.sql('SELECT id FROM orders ORDER BY id DESC LIMIT 50')).split('\n').map(Number);
  assert.deepEqual(ids, expected, 'the table shows the newest orders');
  const m = await page.evaluate(() => {
    globalThis.monitor.stop = true;
    return { ...globalThis.monitor, nodes: document.getElementsByTagName('*').length };
  });
  figure(`during the burst: worst frame gap ${Math.round(m.worstFrame)} ms, ${m.longTasks} long tasks ` +
    `(longest ${Math.round(m.longestTask)} ms), ${m.nodes} DOM elements`);
  assert.ok(m.nodes < 3000, `DOM stays bounded (${m.nodes} elements)`);
  // A page that re-rendered its 100,000 rows per change would freeze for
  // many seconds at every change. The bound leaves room for a starved host:
  // on this shared 2-core machine, a run whose writer itself reached only 386
  // of its 600 changes/s once showed a single 1.18 s task.
  assert.ok(m.worstFrame < 2000, `the page never froze for two seconds (worst frame gap ${Math.round(m.worstFrame)} ms)`);
});

// --- runner ------------------------------------------------------------------------------

async function main() {
  const watchdog = setTimeout(async () => {
    console.error(`the browser tests took longer than ${RUN_LIMIT_MS / 60000} minutes: stopping`);
    await shutdown();
    process.exit(2);
  }, RUN_LIMIT_MS);
  let passed = 0;
  let failed = 0;
  try {
    server = new Ordercast(BIN);
    await server.start(await freePort());
    // Enough orders for two pages, all statuses, and real history.
    await seedOrders((q) => server.sql(q), 150);
    browser = await launchChromium();
    for (const { name, fn } of tests.filter((x) => x.name.includes(ONLY))) {
      const t = { page: null };
      const started = Date.now();
      const file = name.replace(/[^a-z0-9]+/gi, '-').toLowerCase();
      try {
        await within(TEST_LIMIT_MS, name, fn(t));
        if (t.page && !t.page.isClosed()) await t.page.screenshot({ path: join(SHOTS, `${file}.png`) });
        passed += 1;
        console.log(`ok   ${name} (${Date.now() - started} ms)`);
      } catch (e) {
        failed += 1;
        console.log(`FAIL ${name} (${Date.now() - started} ms)\n     ${String(e.stack || e).split('\n').join('\n     ')}`);
        if (t.page && !t.page.isClosed()) await t.page.screenshot({ path: join(SHOTS, `${file}-failed.png`) }).catch(() => {});
        console.log(`     ordercast log (last lines):\n${server.tail(25)}`);
        if (!server.proc || server.proc.exitCode != null || server.proc.signalCode != null) {
          await server.start(server.port).catch((err) => console.log(`     could not restart ordercast: ${err.message}`));
        }
      } finally {
        await t.page?.close().catch(() => {});
        await t.cleanup?.().catch((e) => console.log(`     cleanup: ${e.message}`));
      }
    }
  } catch (e) {
    failed += 1;
    console.log(`FAIL setting up: ${e.stack || e}`);
  } finally {
    clearTimeout(watchdog);
    await shutdown();
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

async function shutdown() {
  await browser?.close().catch(() => {});
  browser = null;
  await server?.cleanup().catch((e) => console.error(`cleanup: ${e.message}`));
  server = null;
}

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.once(sig, async () => {
    await shutdown();
    process.exit(130);
  });
}

main();
