// Random but plausible orders, for the "Random order" and "Fill randomly"
// buttons: a way to see the live table move without writing SQL. Every such
// order is created through the real API like any other.

const FIRST = ['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Frances', 'Ken', 'Margaret', 'Dennis',
  'Radia', 'Leslie', 'Hedy', 'John', 'Katherine', 'Tim', 'Sophie', 'Linus', 'Mary', 'Niklaus'];
const LAST = ['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth', 'Allen', 'Thompson', 'Hamilton',
  'Ritchie', 'Perlman', 'Lamport', 'Lamarr', 'Backus', 'Johnson', 'Berners-Lee', 'Wilson', 'Torvalds', 'Kenneth', 'Wirth'];
/** Product and a typical unit price. */
const PRODUCTS = [
  ['Mechanical keyboard', 129], ['USB-C dock', 189], ['27" monitor', 329], ['Noise-cancelling headphones', 249],
  ['Ergonomic mouse', 59], ['Laptop stand', 45], ['Webcam 4K', 139], ['Desk lamp', 39], ['Standing desk', 549],
  ['Office chair', 399], ['Cable kit', 19], ['Portable SSD 1 TB', 99],
];

const pick = (a) => a[Math.floor(Math.random() * a.length)];

/** @param customer the customer a confined token may create orders for (its orders are all that one's) */
export function randomOrder(customer = null) {
  const first = pick(FIRST);
  const last = pick(LAST);
  const [product, base] = pick(PRODUCTS);
  const price = Math.round(base * (0.85 + Math.random() * 0.3) * 100) / 100;
  const quantity = Math.random() < 0.7 ? 1 : 1 + Math.floor(Math.random() * 5);
  return {
    customer_name: customer ?? `${first} ${last}`,
    customer_email: customer ? null : `${first}.${last}`.toLowerCase().replace(/[^a-z.]/g, '') + '@example.com',
    product,
    quantity,
    unit_price: price.toFixed(2),
  };
}
