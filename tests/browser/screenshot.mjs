// Screenshots of the dashboard with realistic data, for the README:
//   ORDERCAST_BIN=target/debug/ordercast node tests/browser/screenshot.mjs [OUT_DIR]
// Starts its own ordercast, creates a few hundred orders that went through
// the status machine over the last 45 minutes, keeps live traffic going (REST
// orders and psql status changes), and shoots light, dark, phone and an
// order's detail. OUT_DIR defaults to tests/browser/screenshots.

import { mkdirSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ordercast, launchChromium, seedOrders, sleep, within } from './harness.mjs';

const BIN = resolve(process.env.ORDERCAST_BIN || 'target/debug/ordercast');
const OUT = resolve(process.argv[2] || fileURLToPath(new URL('screenshots', import.meta.url)));
mkdirSync(OUT, { recursive: true });

const server = new Ordercast(BIN);
let browser;
let traffic = true;

async function liveTraffic() {
  const names = ['Grace Hopper', 'Alan Turing', 'Radia Perlman', 'Ken Thompson', 'Barbara Liskov', 'Leslie Lamport'];
  const products = [['USB-C dock', 189], ['Mechanical keyboard', 129], ['Webcam 4K', 139], ['Desk lamp', 39]];
  for (let i = 0; traffic; i++) {
    if (i % 3 === 0) {
      const [product, price] = products[i % products.length];
      const name = names[i % names.length];
      await fetch(`${server.url}/api/orders`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ customer_name: name, customer_email: `${name.toLowerCase().replace(' ', '.')}@example.com`,
          product, quantity: 1 + (i % 3), unit_price: (price * (0.9 + (i % 5) / 20)).toFixed(2) }),
      });
    } else {
      await server.sql(`UPDATE orders SET status = CASE status WHEN 'pending' THEN 'processing'
          WHEN 'processing' THEN 'processed' WHEN 'processed' THEN 'shipped' ELSE 'delivered' END
        WHERE id = (SELECT id FROM orders WHERE status IN ('pending','processing','processed','shipped')
                    ORDER BY id DESC OFFSET ${i % 7} LIMIT 1)`);
    }
    await sleep(450);
  }
}

try {
  await server.start();
  await seedOrders((q) => server.sql(q), 420);
  browser = await launchChromium();
  const loop = liveTraffic();
  const shoot = async (name, { width, height, scheme, full = false, detail = false }) => {
    const page = await browser.newPage({ viewport: { width, height }, colorScheme: scheme, deviceScaleFactor: 1 });
    await page.goto(server.url);
    await within(15000, 'live', page.getByText('Live', { exact: true }).waitFor());
    await sleep(6000); // let the feed and the chart fill with live traffic
    if (detail) {
      await page.locator('#orders-body tr[data-status="shipped"] button').first().click();
      await page.locator('#detail-history li').first().waitFor();
      await sleep(800);
    }
    await page.screenshot({ path: join(OUT, name), fullPage: full });
    await page.close();
    console.log(`wrote ${join(OUT, name)}`);
  };
  await sleep(4000);
  await shoot('dashboard.png', { width: 1440, height: 900, scheme: 'light' });
  await shoot('dashboard-dark.png', { width: 1440, height: 900, scheme: 'dark' });
  await shoot('dashboard-phone.png', { width: 390, height: 844, scheme: 'light' });
  await shoot('dashboard-detail.png', { width: 1280, height: 860, scheme: 'light', detail: true });
  traffic = false;
  await loop;
} finally {
  traffic = false;
  await browser?.close().catch(() => {});
  await server.cleanup();
}
