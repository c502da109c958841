//! The steps an order goes through, behind a small trait so that a real
//! payment gateway or warehouse system can replace the simulations.
//!
//! The contract a step implements: `execute` and `compensate` are idempotent
//! per order id (the processor may call either again after a crash, with the
//! same order), and say whether a failure is final (`Rejected`: the order
//! fails and the earlier steps are compensated) or passing (`Unavailable`:
//! the processor tries again later).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use rand::Rng;
use rust_decimal::Decimal;

use super::WorkflowSettings;

/// What a step needs to know about the order.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRef {
    /// Also the idempotency key for every step.
    pub id: i64,
    pub customer: String,
    pub product: String,
    pub quantity: i32,
    pub amount: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// A final answer (declined, out of stock): retrying would not change it.
    #[error("{0}")]
    Rejected(String),
    /// The service could not answer now (timeout, outage): try again later.
    #[error("{0}")]
    Unavailable(String),
}

/// One step of the workflow. The returned text is recorded as the step's
/// detail (a charge id, a reservation) and shown in its history.
pub trait Step: Send + Sync {
    /// Stable: it is stored in `order_steps.step`.
    fn name(&self) -> &'static str;
    fn execute<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<String, StepError>>;
    /// Undoes a successful `execute` (refund, release). Called for a step
    /// whose `execute` was recorded as done, and for one whose `execute` was
    /// called and never answered (the order was cancelled meanwhile, or the
    /// step was given up after `MAX_ATTEMPTS` calls): that call may or may not
    /// have taken effect, and its request may still arrive, so with nothing
    /// to undo it must succeed and void the idempotency key, so that a late
    /// `execute` with it has no effect (a provider's cancel by key).
    ///
    /// `done` is what the step's `execute` answered (its recorded detail: a
    /// charge id, a reservation), or `None` for a call never answered. An
    /// order is often cancelled long after it was processed, when a
    /// provider has forgotten its idempotency key (a payment provider keeps
    /// them for about a day): the charge is then found by its id.
    fn compensate<'a>(&'a self, order: &'a OrderRef, done: Option<&'a str>)
        -> BoxFuture<'a, Result<String, StepError>>;
}

/// The steps in the order they run; compensation runs them backwards.
pub type Steps = Vec<Arc<dyn Step>>;

/// The simulated payment and inventory services, as configured.
pub fn simulated(settings: &WorkflowSettings) -> Steps {
    let latency = settings.step_latency();
    vec![
        Arc::new(SimulatedPayment::new(settings.payment_failure_rate, latency)),
        Arc::new(SimulatedInventory::new(settings.inventory_failure_rate, latency)),
    ]
}

/// How long a simulated service remembers an idempotency key (a payment
/// provider typically keeps them for a day); bounds its memory.
const KEY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// A remote service's memory of what it did, by idempotency key (order id).
/// It lives in this process, as the remote service's own database would live
/// in the remote service: after a restart of ordercast the simulated service
/// has forgotten, which a real one would not.
struct Ledger<T> {
    entries: Mutex<HashMap<i64, (Instant, T)>>,
}

impl<T: Clone> Ledger<T> {
    fn new() -> Self {
        Ledger { entries: Mutex::new(HashMap::new()) }
    }

    fn get(&self, key: i64) -> Option<T> {
        self.entries.lock().unwrap().get(&key).map(|(_, v)| v.clone()) // unwrap: never held across a panic
    }

    fn put(&self, key: i64, value: T) {
        let mut entries = self.entries.lock().unwrap(); // unwrap: never held across a panic
        if entries.len().is_multiple_of(1024) {
            entries.retain(|_, (at, _)| at.elapsed() < KEY_RETENTION);
        }
        entries.insert(key, (Instant::now(), value));
    }
}

/// Waits the configured latency, uniformly between 50% and 150% of it.
async fn simulate_latency(latency: Duration) {
    if latency.is_zero() {
        return;
    }
    let factor = rand::thread_rng().gen_range(0.5..1.5);
    tokio::time::sleep(latency.mul_f64(factor)).await;
}

/// `rate` 0 never fails and 1 always does, so tests can be deterministic.
fn roll(rate: f64) -> bool {
    rate >= 1.0 || (rate > 0.0 && rand::thread_rng().gen_bool(rate))
}

#[derive(Clone, Debug, PartialEq)]
enum Charge {
    Captured(Decimal),
    Refunded(Decimal),
    /// Cancelled before any charge was known: a charge request still on its
    /// way (from a processor that died waiting for it) is refused.
    Voided,
}

/// A payment provider that declines a share of cards.
pub struct SimulatedPayment {
    failure_rate: f64,
    latency: Duration,
    charges: Ledger<Charge>,
}

impl SimulatedPayment {
    pub fn new(failure_rate: f64, latency: Duration) -> Self {
        SimulatedPayment { failure_rate, latency, charges: Ledger::new() }
    }
}

impl Step for SimulatedPayment {
    fn name(&self) -> &'static str {
        "payment"
    }

    fn execute<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            simulate_latency(self.latency).await;
            match self.charges.get(order.id) {
                Some(Charge::Captured(amount)) => {
                    return Ok(format!("charge ch_{} of {amount} (already captured)", order.id))
                }
                Some(Charge::Refunded(_)) => return Err(StepError::Rejected("the charge was refunded".into())),
                Some(Charge::Voided) => {
                    return Err(StepError::Rejected("the charge was voided: the order was cancelled".into()))
                }
                None => {}
            }
            if roll(self.failure_rate) {
                return Err(StepError::Rejected(format!("card declined for {} ({})", order.customer, order.amount)));
            }
            self.charges.put(order.id, Charge::Captured(order.amount));
            Ok(format!("charged {} as ch_{}", order.amount, order.id))
        })
    }

    fn compensate<'a>(
        &'a self,
        order: &'a OrderRef,
        done: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            simulate_latency(self.latency).await;
            match self.charges.get(order.id) {
                Some(Charge::Captured(amount)) => {
                    self.charges.put(order.id, Charge::Refunded(amount));
                    Ok(format!("refunded {amount} of ch_{}", order.id))
                }
                Some(Charge::Refunded(amount)) => Ok(format!("refunded {amount} of ch_{} (already)", order.id)),
                Some(Charge::Voided) => Ok(format!("ch_{} voided (already)", order.id)),
                None => match done.and_then(charge_of) {
                    // Captured, by the processor's record, and the key
                    // forgotten (expired, or the simulation's ledger lived
                    // in a process since restarted): refunded by its id.
                    // The amount captured then, not the order's now (an
                    // update may have changed it since).
                    Some((charge, captured)) => {
                        let amount = captured.unwrap_or(order.amount);
                        self.charges.put(order.id, Charge::Refunded(amount));
                        Ok(format!("refunded {amount} of {charge} (by its charge id)"))
                    }
                    // Never charged, or a charge request still on its way:
                    // the key is voided, so no charge can be captured with
                    // it afterwards.
                    None => {
                        self.charges.put(order.id, Charge::Voided);
                        Ok(format!("no charge known; ch_{} voided", order.id))
                    }
                },
            }
        })
    }
}

/// The charge id in a payment's recorded detail (`charged 19.00 as ch_7`),
/// with the amount captured when the detail names one.
fn charge_of(detail: &str) -> Option<(&str, Option<Decimal>)> {
    let id = detail.split_whitespace().find(|w| w.starts_with("ch_") && w.len() > 3)?;
    Some((id, detail.split_whitespace().find_map(|w| w.parse::<Decimal>().ok())))
}

/// A warehouse that is out of stock for a share of reservations.
pub struct SimulatedInventory {
    failure_rate: f64,
    latency: Duration,
    reservations: Ledger<bool>,
}

impl SimulatedInventory {
    pub fn new(failure_rate: f64, latency: Duration) -> Self {
        SimulatedInventory { failure_rate, latency, reservations: Ledger::new() }
    }
}

impl Step for SimulatedInventory {
    fn name(&self) -> &'static str {
        "inventory"
    }

    fn execute<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            simulate_latency(self.latency).await;
            match self.reservations.get(order.id) {
                Some(true) => return Ok(format!("reserved {} x {} (already)", order.quantity, order.product)),
                // Released (the order was cancelled): a reservation request
                // still on its way is refused.
                Some(false) => return Err(StepError::Rejected("the reservation was released".into())),
                None => {}
            }
            if roll(self.failure_rate) {
                return Err(StepError::Rejected(format!("out of stock: {} x {}", order.quantity, order.product)));
            }
            self.reservations.put(order.id, true);
            Ok(format!("reserved {} x {}", order.quantity, order.product))
        })
    }

    fn compensate<'a>(
        &'a self,
        order: &'a OrderRef,
        _done: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            simulate_latency(self.latency).await;
            self.reservations.put(order.id, false);
            Ok(format!("released {} x {}", order.quantity, order.product))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> OrderRef {
        OrderRef { id: 7, customer: "Ada".into(), product: "Gear".into(), quantity: 2, amount: Decimal::new(1900, 2) }
    }

    #[tokio::test]
    async fn a_payment_is_captured_once_per_order_and_refunded_once() {
        let pay = SimulatedPayment::new(0.0, Duration::ZERO);
        let first = pay.execute(&order()).await.unwrap();
        let again = pay.execute(&order()).await.unwrap();
        assert!(first.starts_with("charged 19.00"), "{first}");
        assert!(again.contains("already captured"), "{again}");
        assert!(pay.compensate(&order(), Some(&first)).await.unwrap().starts_with("refunded 19.00"));
        assert!(pay.compensate(&order(), Some(&first)).await.unwrap().contains("already"));
    }

    #[tokio::test]
    async fn undoing_what_was_never_answered_voids_the_key_for_a_late_request() {
        let pay = SimulatedPayment::new(0.0, Duration::ZERO);
        assert!(pay.compensate(&order(), None).await.unwrap().contains("voided"));
        assert!(matches!(pay.execute(&order()).await, Err(StepError::Rejected(_))));
        let inventory = SimulatedInventory::new(0.0, Duration::ZERO);
        inventory.compensate(&order(), None).await.unwrap();
        assert!(matches!(inventory.execute(&order()).await, Err(StepError::Rejected(_))));
    }

    /// A charge captured before the provider forgot its key (here: the
    /// ledger of a process since restarted) is refunded by its charge id.
    /// Before, it was "voided" by key and the charge kept.
    #[tokio::test]
    async fn a_charge_whose_key_was_forgotten_is_refunded_by_its_id() {
        let charged = SimulatedPayment::new(0.0, Duration::ZERO).execute(&order()).await.unwrap();
        let restarted = SimulatedPayment::new(0.0, Duration::ZERO);
        // The order's amount changed since: the refund is what was captured.
        let now = OrderRef { amount: Decimal::new(2500, 2), ..order() };
        let undone = restarted.compensate(&now, Some(&charged)).await.unwrap();
        assert_eq!(undone, "refunded 19.00 of ch_7 (by its charge id)");
        assert!(restarted.compensate(&order(), Some(&charged)).await.unwrap().contains("already"));
        assert!(
            matches!(restarted.execute(&order()).await, Err(StepError::Rejected(_))),
            "refunded, not captured again"
        );
    }

    #[tokio::test]
    async fn failure_rates_of_zero_and_one_are_deterministic() {
        let inventory = SimulatedInventory::new(1.0, Duration::ZERO);
        for _ in 0..20 {
            assert!(matches!(inventory.execute(&order()).await, Err(StepError::Rejected(_))));
        }
        let pay = SimulatedPayment::new(0.0, Duration::ZERO);
        for id in 0..20 {
            assert!(pay.execute(&OrderRef { id, ..order() }).await.is_ok());
        }
    }

    #[tokio::test]
    async fn a_reservation_survives_a_redelivered_execute_even_when_the_dice_say_no() {
        let inventory = SimulatedInventory::new(0.0, Duration::ZERO);
        inventory.execute(&order()).await.unwrap();
        let flaky = SimulatedInventory { failure_rate: 1.0, ..inventory };
        assert!(flaky.execute(&order()).await.unwrap().contains("already"));
    }
}
