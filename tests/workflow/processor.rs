//! The processor: the happy path, each compensation path, cancellation,
//! retries, restarts mid-order (aborted in-process, and a killed
//! `ordercast process`), and two processors sharing the work.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use ordercast::workflow::processor::{Processor, ProcessorState, MAX_ATTEMPTS};
use ordercast::workflow::steps::{OrderRef, Step, StepError, Steps};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::helpers::{dba_insert_many, eventually, spawn_app, spawn_app_with, TestApp};
use crate::{scalar, until, WAIT};

/// What a test step does when called.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Succeed,
    /// The first call records its effect (a charge), then never answers —
    /// the processor dies waiting; later calls succeed.
    EffectThenHang,
    /// The first call is unavailable; later calls succeed.
    UnavailableOnce,
    /// Every call waits for `release`, then succeeds.
    WaitForRelease,
    /// Every call takes a while, then succeeds.
    Slow,
    /// Every call is refused for good (a declined card).
    Decline,
}

/// A stand-in for a remote service that keeps its own idempotency ledger,
/// so the test can tell a redelivered call from a double charge.
struct TestStep {
    name: &'static str,
    mode: Mode,
    calls: AtomicU32,
    /// Effects by order id: how many times each order was really charged.
    effects: Mutex<HashMap<i64, u32>>,
    /// The idempotency keys (order ids) the service remembers: a call with
    /// one of them has no new effect; a compensation voids its key, so that
    /// a call after it would charge again.
    live: Mutex<std::collections::HashSet<i64>>,
    compensations: Mutex<HashMap<i64, u32>>,
    /// By order id, the `done` its last compensation was given.
    answered: Mutex<HashMap<i64, Option<String>>>,
    /// How many compensation calls to answer "unavailable" first.
    refused_compensations: AtomicU32,
    /// While set, every call is unavailable (the service is down).
    down: std::sync::atomic::AtomicBool,
    /// While set, every compensation call hangs (never answers).
    hang_compensations: std::sync::atomic::AtomicBool,
    compensation_calls: AtomicU32,
    /// While set, every compensation is refused for good (a refund declined).
    reject_compensations: std::sync::atomic::AtomicBool,
    /// When each `execute` call came.
    call_times: Mutex<Vec<std::time::Instant>>,
    entered: Notify,
    release: Notify,
}

impl TestStep {
    fn new(name: &'static str, mode: Mode) -> Arc<TestStep> {
        Arc::new(TestStep {
            name,
            mode,
            calls: AtomicU32::new(0),
            effects: Mutex::default(),
            live: Mutex::default(),
            compensations: Mutex::default(),
            answered: Mutex::default(),
            refused_compensations: AtomicU32::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            hang_compensations: std::sync::atomic::AtomicBool::new(false),
            compensation_calls: AtomicU32::new(0),
            reject_compensations: std::sync::atomic::AtomicBool::new(false),
            call_times: Mutex::default(),
            entered: Notify::new(),
            release: Notify::new(),
        })
    }

    fn effects(&self, id: i64) -> u32 {
        self.effects.lock().unwrap().get(&id).copied().unwrap_or(0)
    }

    fn compensations(&self, id: i64) -> u32 {
        self.compensations.lock().unwrap().get(&id).copied().unwrap_or(0)
    }

    fn answered(&self, id: i64) -> Option<Option<String>> {
        self.answered.lock().unwrap().get(&id).cloned()
    }

    /// Applies the effect unless the key is live, as an idempotent service
    /// does: a redelivered call changes nothing, a call after the effect was
    /// undone is a second charge, which `effects` counts.
    fn apply(&self, id: i64) {
        if self.live.lock().unwrap().insert(id) {
            *self.effects.lock().unwrap().entry(id).or_default() += 1;
        }
    }
}

impl Step for TestStep {
    fn name(&self) -> &'static str {
        self.name
    }

    fn execute<'a>(&'a self, order: &'a OrderRef) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            self.call_times.lock().unwrap().push(std::time::Instant::now());
            self.entered.notify_one();
            if self.down.load(Ordering::SeqCst) {
                return Err(StepError::Unavailable("the service is down".into()));
            }
            match self.mode {
                Mode::EffectThenHang if call == 0 => {
                    self.apply(order.id);
                    std::future::pending::<()>().await;
                }
                Mode::UnavailableOnce if call == 0 => return Err(StepError::Unavailable("connection refused".into())),
                Mode::WaitForRelease => self.release.notified().await,
                Mode::Slow => tokio::time::sleep(Duration::from_millis(100)).await,
                Mode::Decline => return Err(StepError::Rejected("declined".into())),
                _ => {}
            }
            self.apply(order.id);
            Ok(format!("{} done for {}", self.name, order.id))
        })
    }

    fn compensate<'a>(
        &'a self,
        order: &'a OrderRef,
        done: Option<&'a str>,
    ) -> BoxFuture<'a, Result<String, StepError>> {
        Box::pin(async move {
            self.compensation_calls.fetch_add(1, Ordering::SeqCst);
            self.answered.lock().unwrap().insert(order.id, done.map(str::to_string));
            let refuse =
                self.refused_compensations.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            if refuse.is_ok() {
                return Err(StepError::Unavailable(format!("{} cannot undo yet", self.name)));
            }
            if self.hang_compensations.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.reject_compensations.load(Ordering::SeqCst) {
                return Err(StepError::Rejected("the refund was declined".into()));
            }
            *self.compensations.lock().unwrap().entry(order.id).or_default() += 1;
            self.live.lock().unwrap().remove(&order.id);
            Ok(format!("{} undone for {}", self.name, order.id))
        })
    }
}

/// A processor running as a task of the test, stopped or aborted at will.
struct Running {
    task: tokio::task::JoinHandle<()>,
    _stop: watch::Sender<bool>,
    state: Arc<ProcessorState>,
}

fn start(db_url: &str, steps: Steps) -> Running {
    let state = Arc::new(ProcessorState::default());
    let processor = Processor::new(db_url, steps, 8, state.clone()).expect("build the processor");
    let (stop, shutdown) = watch::channel(false);
    Running { task: tokio::spawn(processor.run(shutdown)), _stop: stop, state }
}

/// The processor with the simulated steps, inside the server (`--process`).
async fn app_with_simulation(payment_failure_rate: f64, inventory_failure_rate: f64) -> TestApp {
    spawn_app_with(|s| {
        s.workflow.process = true;
        s.workflow.payment_failure_rate = payment_failure_rate;
        s.workflow.inventory_failure_rate = inventory_failure_rate;
        s.workflow.step_latency_ms = 5;
    })
    .await
}

async fn wait_status(app: &TestApp, id: i64, want: &str) -> Value {
    eventually(WAIT, || async move {
        let (_, order) = app.get_json(&format!("/api/orders/{id}")).await;
        (order["status"] == want).then_some(order)
    })
    .await
}

/// (from, to, by) of an order's status history.
async fn history(app: &TestApp, id: i64) -> Vec<(Value, String, String)> {
    let (_, h) = app.get_json(&format!("/api/orders/{id}/history")).await;
    h.as_array()
        .or_else(|| h["history"].as_array())
        .unwrap_or_else(|| panic!("a history array: {h}"))
        .iter()
        .map(|e| (e["from"].clone(), e["to"].as_str().unwrap().to_string(), e["by"].as_str().unwrap().to_string()))
        .collect()
}

/// (step, action, outcome, attempts, detail) in the order they were recorded.
async fn steps_of(db: &tokio_postgres::Client, id: i64) -> Vec<(String, String, String, i32, String)> {
    db.query(
        "SELECT step, action, outcome, attempts, coalesce(detail, '') FROM order_steps WHERE order_id = $1 ORDER BY id",
        &[&id],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

fn outcomes(steps: &[(String, String, String, i32, String)]) -> Vec<(&str, &str, &str)> {
    steps.iter().map(|(s, a, o, _, _)| (s.as_str(), a.as_str(), o.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_happy_path_moves_an_order_through_payment_and_inventory_to_processed() {
    // Arrange
    let app = app_with_simulation(0.0, 0.0).await;
    let mut ws = app.ws("").await;
    ws.ready().await;

    // Act
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();

    // Assert: the order is processed, every move recorded and pushed.
    let order = wait_status(&app, id, "processed").await;
    assert!(order["error_message"].is_null());
    let h = history(&app, id).await;
    let moves: Vec<(Value, &str, &str)> = h.iter().map(|(f, t, b)| (f.clone(), t.as_str(), b.as_str())).collect();
    assert_eq!(
        moves[1..],
        [(json!("pending"), "processing", "processor"), (json!("processing"), "processed", "processor")]
    );
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(outcomes(&steps), [("payment", "execute", "done"), ("inventory", "execute", "done")]);
    assert_eq!(steps[0].4, format!("charged 19.00 as ch_{id}"));
    let pushed = ws.changes(3, WAIT).await;
    let by_processor: Vec<&str> = pushed[1..].iter().map(|c| c["order"]["status"].as_str().unwrap()).collect();
    assert_eq!(by_processor, ["processing", "processed"]);
    assert!(pushed[1..].iter().all(|c| c["actor"] == "processor"), "{pushed:?}");
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["workflow"]["processor"]["processed"], 1, "{health}");
    assert_eq!(crate::metric(&app, "ordercast_processor_processed_total").await, Some(1.0));
    assert_eq!(crate::metric(&app, "ordercast_processor_claimed_total").await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_payment_fails_the_order_and_never_reaches_inventory() {
    // Arrange
    let app = app_with_simulation(1.0, 0.0).await;

    // Act
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();

    // Assert: nothing was done, so nothing is compensated.
    let order = wait_status(&app, id, "failed").await;
    let message = order["error_message"].as_str().unwrap();
    assert!(message.starts_with("payment failed: card declined"), "{message}");
    assert!(!message.contains("compensated"), "{message}");
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(outcomes(&steps), [("payment", "execute", "failed")]);
    let h = history(&app, id).await;
    assert_eq!(h.last().unwrap(), &(json!("processing"), "failed".to_string(), "processor".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inventory_failure_refunds_the_payment_and_fails_the_order() {
    // Arrange
    let app = app_with_simulation(0.0, 1.0).await;

    // Act
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();

    // Assert: the payment was made, then refunded; the message says so.
    let order = wait_status(&app, id, "failed").await;
    let message = order["error_message"].as_str().unwrap();
    assert!(message.starts_with("inventory failed: out of stock: 2 x Widget"), "{message}");
    assert!(message.contains(&format!("compensated: payment (refunded 19.00 of ch_{id})")), "{message}");
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(
        outcomes(&steps),
        [("payment", "execute", "done"), ("inventory", "execute", "failed"), ("payment", "compensate", "done")]
    );
    let (_, health) = app.get_json("/api/health").await;
    assert_eq!(health["workflow"]["processor"]["compensations"], 1, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_two_steps_compensates_both_in_reverse() {
    // Arrange: three steps; the last one refuses.
    let app = spawn_app().await;
    let (payment, inventory) = (TestStep::new("payment", Mode::Succeed), TestStep::new("inventory", Mode::Succeed));
    let shipping: Arc<dyn Step> = Arc::new(ordercast::workflow::steps::SimulatedInventory::new(1.0, Duration::ZERO));
    struct Named(Arc<dyn Step>);
    impl Step for Named {
        fn name(&self) -> &'static str {
            "shipping"
        }
        fn execute<'a>(&'a self, o: &'a OrderRef) -> BoxFuture<'a, Result<String, StepError>> {
            self.0.execute(o)
        }
        fn compensate<'a>(
            &'a self,
            o: &'a OrderRef,
            done: Option<&'a str>,
        ) -> BoxFuture<'a, Result<String, StepError>> {
            self.0.compensate(o, done)
        }
    }
    let _p = start(&app.db_url, vec![payment.clone(), inventory.clone(), Arc::new(Named(shipping))]);

    // Act
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();

    // Assert
    wait_status(&app, id, "failed").await;
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(
        outcomes(&steps),
        [
            ("payment", "execute", "done"),
            ("inventory", "execute", "done"),
            ("shipping", "execute", "failed"),
            ("inventory", "compensate", "done"),
            ("payment", "compensate", "done"),
        ]
    );
    assert_eq!((payment.compensations(id), inventory.compensations(id)), (1, 1));
}

/// A processor whose inventory step waits for the test, and an order a user
/// cancels while inventory is called; then the warehouse answers.
async fn cancelled_mid_way(app: &TestApp, payment: &Arc<TestStep>, inventory: &Arc<TestStep>) -> (Running, i64) {
    let p = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    tokio::time::timeout(WAIT, inventory.entered.notified()).await.expect("inventory is called");
    let r = app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    inventory.release.notify_one();
    (p, id)
}

/// The order's four step records (two steps, each done and undone) once
/// none is still `started` (a step is recorded as started before it is
/// called).
async fn all_four_finished(app: &TestApp, id: i64) -> Vec<(String, String, String, i32, String)> {
    let db = app.sql().await;
    eventually(WAIT, || {
        let db = &db;
        async move {
            let steps = steps_of(db, id).await;
            (steps.len() == 4 && steps.iter().all(|s| s.2 != "started")).then_some(steps)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_while_it_is_processed_gets_its_steps_undone() {
    // Arrange: inventory waits for the test.
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::WaitForRelease);

    // Act: a user cancels mid-way, then the warehouse answers.
    let (_p, id) = cancelled_mid_way(&app, &payment, &inventory).await;

    // Assert: both steps undone, the order stays cancelled.
    let steps = all_four_finished(&app, id).await;
    assert_eq!(
        outcomes(&steps),
        [
            ("payment", "execute", "done"),
            ("inventory", "execute", "done"),
            ("inventory", "compensate", "done"),
            ("payment", "compensate", "done"),
        ]
    );
    assert_eq!(wait_status(&app, id, "cancelled").await["error_message"], Value::Null);
    assert_eq!((payment.compensations(id), inventory.compensations(id)), (1, 1));
    // The note of the cancellation in processing goes once all is undone.
    until(&app.sql().await, &format!("SELECT count(*) FROM order_undo WHERE order_id = {id}"), |n| n == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_step_is_retried_until_it_answers() {
    // Arrange
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::UnavailableOnce);
    let p = start(&app.db_url, vec![payment.clone(), TestStep::new("inventory", Mode::Succeed)]);

    // Act
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();

    // Assert: processed on the second call, which the record counts.
    wait_status(&app, id, "processed").await;
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(steps[0].3, 2, "payment attempts: {steps:?}");
    assert_eq!(payment.calls.load(Ordering::SeqCst), 2);
    assert_eq!(payment.effects(id), 1);
    assert_eq!(p.state.retries.load(Ordering::Relaxed), 1);
}

/// A step that stays unavailable is called again after a pause that grows
/// (5 s, then 10 s, ...), whichever processor takes the order up: the pause
/// is in the step's record. Before, it was kept by the processor that
/// released the order, and another one's scan took it at once: with two
/// processors, ten calls came within about a minute and a short outage of
/// the service failed the order for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_before_an_unavailable_step_is_called_again_grows_and_holds_for_every_processor() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    payment.down.store(true, Ordering::SeqCst);
    let steps = || -> Steps { vec![payment.clone(), TestStep::new("inventory", Mode::Succeed)] };
    let (_a, _b) = (start(&app.db_url, steps()), start(&app.db_url, steps()));
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    eventually(Duration::from_secs(60), || async { (payment.call_times.lock().unwrap().len() >= 3).then_some(()) })
        .await;
    let times = payment.call_times.lock().unwrap().clone();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= Duration::from_millis(4900), "called again before its pause: {gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(9900), "the second pause did not double: {gaps:?}");
    // After the third call, the pause is 20 s.
    let pause = format!(
        "SELECT extract(epoch FROM retry_at - started_at)::float8 FROM order_steps \
         WHERE order_id = {id} AND step = 'payment' AND action = 'execute'"
    );
    eventually(WAIT, || async { (scalar::<f64>(&db, &pause).await > 19.0).then_some(()) }).await;
    // (From the call's start: the call and its record take a moment.)
    assert!(scalar::<f64>(&db, &pause).await < 25.0);
    // Once the service is back, the order goes on.
    payment.down.store(false, Ordering::SeqCst);
    db.execute(&format!("UPDATE order_steps SET retry_at = now() WHERE order_id = {id}"), &[]).await.unwrap();
    wait_status(&app, id, "processed").await;
    assert_eq!(payment.effects(id), 1);
}

/// An order cancelled while its step waits out a long pause is undone at
/// once: the pause holds for calling the step again, not for undoing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_while_its_step_waits_to_be_called_again_is_undone_at_once() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    payment.down.store(true, Ordering::SeqCst);
    let _p = start(&app.db_url, vec![payment.clone(), TestStep::new("inventory", Mode::Succeed)]);
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    let paused = format!("SELECT count(*) FROM order_steps WHERE order_id = {id} AND retry_at IS NOT NULL");
    until(&db, &paused, |n| n == 1).await;
    // Its next call an hour away (the pause grown after many calls).
    db.execute(&format!("UPDATE order_steps SET retry_at = now() + interval '1 hour' WHERE order_id = {id}"), &[])
        .await
        .unwrap();
    let r = app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The unanswered call may have charged: it is undone, within a scan.
    eventually(WAIT, || async { (payment.compensations(id) == 1).then_some(()) }).await;
    assert_eq!(payment.calls.load(Ordering::SeqCst), 1, "the step was not called again");
}

/// Orders sent back to retry while a service was down come before new
/// orders once they are due: a backlog of new ones does not hold them up.
/// Before, each scan took as many as it had free slots at that moment (one,
/// usually), every 5 s, and new claims filled the rest: eight retried
/// orders waited behind hundreds of new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_sent_back_to_retry_come_before_a_backlog_of_new_ones() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let payment = TestStep::new("payment", Mode::Slow);
    let p = start(&app.db_url, vec![payment.clone(), TestStep::new("inventory", Mode::Succeed)]);
    payment.down.store(true, Ordering::SeqCst);
    let mut retried = Vec::new();
    for i in 0..8 {
        retried.push(app.create_order(&format!("Retried {i}")).await["id"].as_i64().unwrap());
    }
    eventually(WAIT, || async { (p.state.retries.load(Ordering::Relaxed) >= 8).then_some(()) }).await;
    payment.down.store(false, Ordering::SeqCst);
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Backlog ' || i, 'Nut', 1, 0.1 FROM generate_series(1, 1500) i",
    )
    .await
    .unwrap();
    let done = format!("SELECT count(*) FROM orders WHERE id = ANY('{{{}}}') AND status = 'processed'", {
        let ids: Vec<String> = retried.iter().map(i64::to_string).collect();
        ids.join(",")
    });
    until(&db, &done, |n| n == 8).await;
    let backlog: i64 =
        scalar(&db, "SELECT count(*) FROM orders WHERE customer_name LIKE 'Backlog %' AND status <> 'processed'").await;
    assert!(backlog > 500, "the retried orders finished behind the backlog: {backlog} of 1500 left");
    for id in retried {
        assert_eq!(payment.effects(id), 1);
    }
}

/// Undoing a cancelled order's steps is taken up again when a compensation
/// is unavailable at first: the order is cancelled, so the scan for orders
/// in processing would never see it again, and the payment stayed charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_whose_refund_is_unavailable_at_first_is_refunded_later() {
    // Arrange: the payment service cannot refund at the first try.
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    payment.refused_compensations.store(1, Ordering::SeqCst);
    let inventory = TestStep::new("inventory", Mode::WaitForRelease);

    // Act: a user cancels mid-way, then the warehouse answers.
    let (p, id) = cancelled_mid_way(&app, &payment, &inventory).await;

    // Assert: both steps undone in the end, the payment refunded once.
    let steps = all_four_finished(&app, id).await;
    assert!(steps.iter().all(|s| s.2 == "done"), "{steps:?}");
    assert_eq!(payment.compensations(id), 1);
    assert_eq!(inventory.compensations(id), 1);
    let refund = steps.iter().find(|s| (s.0.as_str(), s.1.as_str()) == ("payment", "compensate")).unwrap();
    assert_eq!(refund.3, 2, "the refund was asked twice: {steps:?}");
    assert_eq!(p.state.resumed.load(Ordering::Relaxed), 1);
    let (_, order) = app.get_json(&format!("/api/orders/{id}")).await;
    assert_eq!(order["status"], "cancelled");
}

/// A processor with `steps` that dies while `waited` is called (the test
/// step never answers it): the order it leaves behind.
async fn died_during(app: &TestApp, steps: [&Arc<TestStep>; 2], waited: &Arc<TestStep>) -> i64 {
    let first = start(&app.db_url, steps.iter().map(|s| Arc::clone(*s) as Arc<dyn Step>).collect());
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    tokio::time::timeout(WAIT, waited.entered.notified()).await.expect("the step is called");
    first.task.abort();
    let _ = first.task.await;
    id
}

/// A step given up after `MAX_ATTEMPTS` unanswered calls may have taken
/// effect as well: it is undone with the steps before it. Before, only the
/// payment was refunded and the stock stayed reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_given_up_after_unanswered_calls_is_undone_with_the_others() {
    // Arrange: an order left in processing with its payment done and its
    // reservation asked the last allowed time, never answered.
    let app = spawn_app().await;
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    let db = app.sql().await;
    db.batch_execute(&format!(
        "UPDATE orders SET status = 'processing' WHERE id = {id}; \
         INSERT INTO order_steps (order_id, step, action, outcome, detail, attempts) VALUES \
           ({id}, 'payment', 'execute', 'done', 'charged', 1), \
           ({id}, 'inventory', 'execute', 'started', 'warehouse timed out', {MAX_ATTEMPTS})"
    ))
    .await
    .unwrap();
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::Succeed);

    // Act: a processor takes the order over.
    let _p = start(&app.db_url, vec![payment.clone(), inventory.clone()]);

    // Assert: given up without another call, both undone, last first.
    let order = wait_status(&app, id, "failed").await;
    let message = order["error_message"].as_str().unwrap();
    assert!(message.starts_with("inventory failed: gave up after 10 attempts: warehouse timed out"), "{message}");
    assert!(message.contains("compensated: inventory (inventory undone"), "{message}");
    undone_once(&steps_of(&db, id).await, "failed", (0, 0), &payment, &inventory, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_that_dies_mid_payment_is_resumed_without_charging_twice() {
    // Arrange: the payment service charges, then its answer is lost.
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::EffectThenHang);
    let inventory = TestStep::new("inventory", Mode::Succeed);

    // Act: the processor dies while the payment is called; a new one starts.
    let id = died_during(&app, [&payment, &inventory], &payment).await;
    let second = start(&app.db_url, vec![payment.clone(), inventory.clone()]);

    // Assert: the order completes exactly once, charged once.
    wait_status(&app, id, "processed").await;
    assert_eq!(payment.calls.load(Ordering::SeqCst), 2, "the payment was asked again, with the same key");
    assert_eq!(payment.effects(id), 1, "and charged once");
    assert_eq!(inventory.calls.load(Ordering::SeqCst), 1);
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(outcomes(&steps), [("payment", "execute", "done"), ("inventory", "execute", "done")]);
    assert_eq!(steps[0].3, 2, "two payment attempts recorded");
    let h = history(&app, id).await;
    assert_eq!(h.iter().filter(|(_, to, _)| to == "processing").count(), 1);
    assert_eq!(h.iter().filter(|(_, to, _)| to == "processed").count(), 1);
    assert_eq!(second.state.resumed.load(Ordering::Relaxed), 1);
}

/// A payment service that takes the request (and charges) but never
/// answers, while the processor lives on: the call is given up after the
/// step's time limit and asked again with the same key, so the order goes
/// on, charged once. Before, the call waited for ever and held the order,
/// and its lock, for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_never_answers_is_asked_again_after_its_time_limit() {
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::EffectThenHang);
    let inventory = TestStep::new("inventory", Mode::Succeed);
    let state = Arc::new(ProcessorState::default());
    let processor = Processor::new(&app.db_url, vec![payment.clone(), inventory.clone()], 8, state.clone())
        .expect("build the processor")
        .with_step_timeout(Duration::from_secs(1));
    let (_stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(processor.run(shutdown));
    let id = app.create_order("Hung Payment").await["id"].as_i64().unwrap();
    wait_status(&app, id, "processed").await;
    task.abort();
    assert_eq!(payment.calls.load(Ordering::SeqCst), 2, "asked again after the time limit");
    assert_eq!(payment.effects(id), 1, "and charged once");
    let steps = steps_of(&app.sql().await, id).await;
    assert_eq!(outcomes(&steps), [("payment", "execute", "done"), ("inventory", "execute", "done")]);
    assert_eq!(steps[0].3, 2, "two payment attempts recorded");
}

/// The processor's own statements (its scans, its claims) are not cut short
/// by the database's defaults: here a `lock_timeout` of 100 ms while a DBA
/// holds a lock the scan needs. Before, the scan failed, which ended the
/// processor's session and dropped its orders in flight, and each was
/// called again (one more attempt, towards giving up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_lock_timeout_does_not_drop_the_orders_in_flight() {
    let app = spawn_app().await;
    let db = app.sql().await;
    db.batch_execute(&format!("ALTER DATABASE \"{}\" SET lock_timeout = '100ms'", app.db_name)).await.unwrap();
    let payment = TestStep::new("payment", Mode::WaitForRelease);
    let p = start(&app.db_url, vec![payment.clone()]);
    let id = app.create_order("Locked Out").await["id"].as_i64().unwrap();
    tokio::time::timeout(WAIT, payment.entered.notified()).await.expect("payment is called");
    // Held past the next scan (every 5 s).
    let mut dba = app.sql().await;
    let tx = dba.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL lock_timeout = 0; LOCK TABLE order_undo IN ACCESS EXCLUSIVE MODE").await.unwrap();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    tx.commit().await.unwrap();
    payment.release.notify_one();
    wait_status(&app, id, "processed").await;
    assert_eq!(payment.calls.load(Ordering::SeqCst), 1, "called once: {}", p.state.health());
    let steps = steps_of(&db, id).await;
    assert_eq!(steps[0].3, 1, "one attempt recorded");
    p.task.abort();
}

/// An order cancelled after its steps were done, taken up by a processor
/// that does not run one of them (a rolling deploy: an instance with an
/// older list of steps), waits for one that does, its note kept, and is
/// then undone whole, last step first. Before, that step's record was
/// skipped, the payment refunded and the note deleted: nothing released
/// the reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_this_processor_does_not_run_is_left_for_one_that_does() {
    let app = spawn_app().await;
    let db = app.sql().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::Succeed);
    let both = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    let id = app.create_order("Rolling Deploy").await["id"].as_i64().unwrap();
    wait_status(&app, id, "processed").await;
    both.task.abort();
    let older = start(&app.db_url, vec![payment.clone()]);
    let r = app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let state = older.state.clone();
    eventually(WAIT, || async { (state.health()["retries"].as_u64() >= Some(1)).then_some(()) }).await;
    let notes: i64 = db.query_one("SELECT count(*) FROM order_undo WHERE order_id = $1", &[&id]).await.unwrap().get(0);
    assert_eq!((notes, payment.compensations(id), inventory.compensations(id)), (1, 0, 0));
    let last = older.state.health()["last_error"].as_str().unwrap_or_default().to_string();
    assert!(last.contains("compensating inventory: this processor does not run that step"), "{last}");
    older.task.abort();
    let both = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    let steps = both_compensated(&db, id).await;
    assert_eq!(
        outcomes(&steps)[2..],
        [("inventory", "compensate", "done"), ("payment", "compensate", "done")],
        "last step first"
    );
    assert_eq!((payment.compensations(id), inventory.compensations(id)), (1, 1));
    both.task.abort();
}

/// An order left in processing with its payment done and its `inventory`
/// step recorded as `outcome` by an instance that runs it (a rolling
/// deploy; that instance died before going on).
async fn left_by_a_newer_instance(app: &TestApp, outcome: &str, detail: &str) -> i64 {
    let id = app.create_order("Rolling Deploy").await["id"].as_i64().unwrap();
    app.sql()
        .await
        .batch_execute(&format!(
            "UPDATE orders SET status = 'processing' WHERE id = {id}; \
             INSERT INTO order_steps (order_id, step, action, outcome, detail) VALUES \
               ({id}, 'payment', 'execute', 'done', 'charged'), \
               ({id}, 'inventory', 'execute', '{outcome}', '{detail}')"
        ))
        .await
        .unwrap();
    id
}

/// Such an order whose reservation was refused, taken up by an instance
/// that does not run that step: it fails, its payment refunded, as the
/// instance that refused it would have done. Before, its own steps being
/// done, it marked the order processed and kept the payment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_another_instance_refused_fails_the_order_here_too() {
    let app = spawn_app().await;
    let id = left_by_a_newer_instance(&app, "failed", "out of stock").await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let older = start(&app.db_url, vec![payment.clone()]);
    let order = wait_status(&app, id, "failed").await;
    let message = order["error_message"].as_str().unwrap_or_default();
    assert!(message.starts_with("inventory failed: out of stock; compensated: payment (payment undone"), "{message}");
    assert_eq!((payment.calls.load(Ordering::SeqCst), payment.compensations(id)), (0, 1));
    older.task.abort();
}

/// Such an order whose reservation was begun and not answered waits for an
/// instance that runs that step, and is then finished there. Before, the
/// instance that does not run it marked the order processed, the
/// reservation's outcome unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_another_instance_began_waits_for_one_that_runs_it() {
    let app = spawn_app().await;
    let id = left_by_a_newer_instance(&app, "started", "").await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::Succeed);
    let older = start(&app.db_url, vec![payment.clone()]);
    let state = older.state.clone();
    eventually(WAIT, || async { (state.health()["retries"].as_u64() >= Some(1)).then_some(()) }).await;
    let last = older.state.health()["last_error"].as_str().unwrap_or_default().to_string();
    assert!(last.contains("inventory: this processor does not run that step"), "{last}");
    let (_, order) = app.get_json(&format!("/api/orders/{id}")).await;
    assert_eq!(order["status"], "processing");
    older.task.abort();
    let both = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    wait_status(&app, id, "processed").await;
    assert_eq!((payment.calls.load(Ordering::SeqCst), inventory.calls.load(Ordering::SeqCst)), (0, 1));
    both.task.abort();
}

/// A compensation refused for good on an order another writer cancelled is
/// said where a person sees it: the order's error message (the dashboard
/// shows it, and a change carries it to every client), `last_error` and a
/// counter in `/api/health`. Before, only the log said it; the order looked
/// cancelled and settled, its payment kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_refused_for_good_is_said_on_the_order_and_in_health() {
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let p = start(&app.db_url, vec![payment.clone()]);
    let id = app.create_order("Declined Refund").await["id"].as_i64().unwrap();
    // One whose message is as long as the API takes: cut to leave room.
    let long = app.create_order("Declined Refund, Long").await["id"].as_i64().unwrap();
    wait_status(&app, id, "processed").await;
    wait_status(&app, long, "processed").await;
    let r = app.patch(long, &json!({"error_message": "x".repeat(2000)})).await;
    assert_eq!(r.status(), 200);
    payment.reject_compensations.store(true, Ordering::SeqCst);
    let note = "compensating payment failed: the refund was declined; left for a person";
    let mut messages = Vec::new();
    for order in [id, long] {
        let r = app.http.post(app.url(&format!("/api/orders/{order}/cancel"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let order = eventually(WAIT, || async {
            let (_, order) = app.get_json(&format!("/api/orders/{order}")).await;
            order["error_message"].as_str().is_some_and(|m| m.ends_with(note)).then_some(order)
        })
        .await;
        assert_eq!(order["status"], "cancelled");
        messages.push(order["error_message"].as_str().unwrap().to_string());
    }
    assert_eq!(messages[0], note);
    assert!(messages[1].starts_with("xxx") && messages[1].chars().count() == 2000, "{}", messages[1]);
    let health = p.state.health();
    assert_eq!(health["compensations_failed"], 2, "{health}");
    let last = health["last_error"].as_str().unwrap_or_default();
    assert!(last.contains(&format!("order {long}: compensating payment failed")), "{health}");
    p.task.abort();
}

/// New orders are claimed while orders to undo are tried again and again:
/// here a refund service that hangs, each call waiting out its time limit,
/// with many more cancelled orders than the processor has slots. A quarter
/// of the slots stay for new orders. Before, every slot that freed went to
/// the next order to undo, and a new order waited for the scan to pass
/// every one of them (here 128 calls of a second, 8 at a time; with the
/// real minute's limit and a thousand cancellations, half an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_orders_are_claimed_while_orders_to_undo_hang() {
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let state = Arc::new(ProcessorState::default());
    let processor = Processor::new(&app.db_url, vec![payment.clone()], 8, state.clone())
        .expect("build the processor")
        .with_step_timeout(Duration::from_secs(1));
    let (_stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(processor.run(shutdown));
    let db = app.sql().await;
    dba_insert_many(&db, "Refund", 128).await;
    until(&db, "SELECT count(*) FROM orders WHERE status = 'processed'", |n| n == 128).await;
    payment.hang_compensations.store(true, Ordering::SeqCst);
    db.execute("UPDATE orders SET status = 'cancelled'", &[]).await.unwrap();
    // The refunds are under way, hanging, and more are waiting.
    eventually(WAIT, || async { (state.health()["in_flight"].as_u64() >= Some(6)).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let id = app.create_order("New while refunds hang").await["id"].as_i64().unwrap();
    wait_status(&app, id, "processed").await;
    let calls = payment.compensation_calls.load(Ordering::SeqCst);
    task.abort();
    assert!(calls < 128, "the new order waited for {calls} refund calls, a pass over every cancelled order");
}

/// The order's step records once both its compensations are done.
async fn both_compensated(db: &tokio_postgres::Client, id: i64) -> Vec<(String, String, String, i32, String)> {
    eventually(WAIT, || async move {
        let steps = steps_of(db, id).await;
        (steps.iter().filter(|s| s.1 == "compensate" && s.2 == "done").count() == 2).then_some(steps)
    })
    .await
}

/// Both steps undone once, last first, each compensation given what its
/// step's call answered (nothing for one never answered); `inventory_call`
/// is how the reservation's call stands in the record, `calls` how often
/// each step was called by the test's processors.
fn undone_once(
    steps: &[(String, String, String, i32, String)],
    inventory_call: &str,
    calls: (u32, u32),
    payment: &TestStep,
    inventory: &TestStep,
    id: i64,
) {
    assert_eq!(
        outcomes(steps),
        [
            ("payment", "execute", "done"),
            ("inventory", "execute", inventory_call),
            ("inventory", "compensate", "done"),
            ("payment", "compensate", "done"),
        ]
    );
    assert_eq!((payment.compensations(id), inventory.compensations(id)), (1, 1));
    assert_eq!((payment.calls.load(Ordering::SeqCst), inventory.calls.load(Ordering::SeqCst)), calls);
    let reserved = (inventory_call == "done").then(|| steps[1].4.clone());
    assert_eq!((payment.answered(id), inventory.answered(id)), (Some(Some(steps[0].4.clone())), Some(reserved)));
}

/// An order cancelled while no processor runs, after its owner died in the
/// middle of a step: no compensation had begun and the order had left
/// `processing`, so no scan found it and the payment stayed charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_cancelled_after_its_processor_died_gets_its_steps_undone_by_the_next() {
    // Arrange: the payment is taken; the warehouse reserves, then its answer
    // is lost and the processor dies waiting.
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::EffectThenHang);
    let id = died_during(&app, [&payment, &inventory], &inventory).await;

    // Act: a user cancels while no processor runs; then one starts.
    let r = app.http.post(app.url(&format!("/api/orders/{id}/cancel"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let db = app.sql().await;
    let noted = format!("SELECT count(*) FROM order_undo WHERE order_id = {id}");
    assert_eq!(scalar::<i64>(&db, &noted).await, 1, "the cancellation in processing is noted");
    let second = start(&app.db_url, vec![payment.clone(), inventory.clone()]);

    // Assert: both undone once (the reservation whose answer was lost too),
    // nothing called again, the note gone, the order still cancelled.
    let steps = both_compensated(&db, id).await;
    undone_once(&steps, "started", (1, 1), &payment, &inventory, id);
    assert_eq!(second.state.resumed.load(Ordering::Relaxed), 1);
    until(&db, &noted, |n| n == 0).await;
}

/// Nothing undid the steps of an order cancelled once it was processed: the
/// payment stayed charged and the stock reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processed_order_that_is_cancelled_gets_its_steps_undone() {
    // Arrange: an order processed through both steps.
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::Succeed);
    let p = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    wait_status(&app, id, "processed").await;

    // Act: a DBA cancels it in psql.
    let db = app.sql().await;
    db.batch_execute(&format!("UPDATE orders SET status = 'cancelled' WHERE id = {id}")).await.unwrap();

    // Assert: both undone once, last first; the note gone.
    let steps = all_four_finished(&app, id).await;
    undone_once(&steps, "done", (1, 1), &payment, &inventory, id);
    until(&db, &format!("SELECT count(*) FROM order_undo WHERE order_id = {id}"), |n| n == 0).await;
    assert_eq!(p.state.resumed.load(Ordering::Relaxed), 1);
    // Counted once the order's lock is let go, after the note is deleted.
    eventually(WAIT, || async { (p.state.cancelled.load(Ordering::Relaxed) == 1).then_some(()) }).await;
}

/// `processor` with `n` new orders to work on, once the count of orders in
/// processing satisfies `ready`.
async fn busy(db: &tokio_postgres::Client, processor: Running, n: i64, ready: impl Fn(i64) -> bool) -> Running {
    db.batch_execute(&format!(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Bulk ' || i, 'Nut', 1, 0.1 FROM generate_series(1, {n}) i"
    ))
    .await
    .unwrap();
    until(db, "SELECT count(*) FROM orders WHERE status = 'processing'", ready).await;
    processor
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processors_share_the_orders_and_do_none_twice() {
    // Arrange: one processor is busy with slow payments when the second
    // starts, so the second's first scan meets orders the first one owns.
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::Slow);
    let inventory = TestStep::new("inventory", Mode::Succeed);
    let db = app.sql().await;
    let a = busy(&db, start(&app.db_url, vec![payment.clone(), inventory.clone()]), 60, |n| n > 0).await;

    // Act
    let b = start(&app.db_url, vec![payment.clone(), inventory.clone()]);

    // Assert: all processed, each paid for and reserved exactly once, and
    // both took part.
    until(&db, "SELECT count(*) FROM orders WHERE status = 'processed'", |n| n == 60).await;
    assert_eq!(payment.calls.load(Ordering::SeqCst), 60);
    assert_eq!(inventory.calls.load(Ordering::SeqCst), 60);
    let (claimed_a, claimed_b) = (a.state.claimed.load(Ordering::Relaxed), b.state.claimed.load(Ordering::Relaxed));
    assert_eq!(claimed_a + claimed_b, 60);
    assert!(claimed_b > 0, "the second processor claimed none");
    assert_eq!(b.state.resumed.load(Ordering::Relaxed), 0, "it took over orders the first one owned");
    let attempts: i64 = scalar(&db, "SELECT sum(attempts)::bigint FROM order_steps").await;
    assert_eq!(attempts, 120);
}

/// An orphan behind orders a live processor holds is taken over at the
/// next scan, even by a processor with one free slot. Before, a scan looked
/// at as many candidates as it had free slots: one held order per scan,
/// five seconds each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_behind_orders_another_processor_holds_is_taken_over_at_once() {
    // Arrange: processor a holds eight orders in processing (its payments
    // wait), and an order with a higher id is in processing without a
    // processor (moved there by hand).
    let app = spawn_app().await;
    let payment = TestStep::new("payment", Mode::WaitForRelease);
    let inventory = TestStep::new("inventory", Mode::Succeed);
    let db = app.sql().await;
    let _a = busy(&db, start(&app.db_url, vec![payment.clone(), inventory.clone()]), 8, |n| n == 8).await;
    let orphan = app.create_order("Orphan").await["id"].as_i64().unwrap();
    db.batch_execute(&format!("UPDATE orders SET status = 'processing' WHERE id = {orphan}")).await.unwrap();

    // Act: a processor with one slot, whose steps answer at once.
    let quick = TestStep::new("payment", Mode::Succeed);
    let state = Arc::new(ProcessorState::default());
    let steps: Steps = vec![quick.clone(), inventory.clone()];
    let processor = Processor::new(&app.db_url, steps, 1, state.clone()).expect("build the processor");
    let (_stop, shutdown) = watch::channel(false);
    let _b = tokio::spawn(processor.run(shutdown));

    // Assert: its first scan takes the orphan over (eight scans, forty
    // seconds, before).
    let started = std::time::Instant::now();
    wait_status(&app, orphan, "processed").await;
    assert!(started.elapsed() < Duration::from_secs(10), "taken over after {:?}", started.elapsed());
    assert_eq!(state.resumed.load(Ordering::Relaxed), 1);
    assert_eq!(quick.calls.load(Ordering::SeqCst), 1);
}

/// `ordercast process` as a child process.
struct ProcessChild(std::process::Child);

impl ProcessChild {
    fn start(db_url: &str, latency_ms: u64) -> ProcessChild {
        let child = Command::new(env!("CARGO_BIN_EXE_ordercast"))
            .arg("process")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATABASE_URL", db_url)
            .env("ORDERCAST_PAYMENT_FAILURE_RATE", "0")
            .env("ORDERCAST_INVENTORY_FAILURE_RATE", "0")
            .env("ORDERCAST_STEP_LATENCY_MS", latency_ms.to_string())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ordercast process");
        ProcessChild(child)
    }

    fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.0.id() as i32)
    }
}

impl Drop for ProcessChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_command_leaves_every_order_to_its_successor() {
    // Arrange: slow steps, so SIGKILL lands mid-payment.
    let app = spawn_app().await;
    let db = app.sql().await;
    let mut first = ProcessChild::start(&app.db_url, 60_000);
    db.batch_execute(
        "INSERT INTO orders (customer_name, product, quantity, unit_price) \
         SELECT 'Killed ' || i, 'Gear', 1, 2 FROM generate_series(1, 5) i",
    )
    .await
    .unwrap();
    until(&db, "SELECT count(*) FROM order_steps WHERE outcome = 'started'", |n| n == 5).await;

    // Act
    nix::sys::signal::kill(first.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    let _ = first.0.wait();
    let mut second = ProcessChild::start(&app.db_url, 1);

    // Assert: all five completed once, each payment attempted twice.
    until(&db, "SELECT count(*) FROM orders WHERE status = 'processed'", |n| n == 5).await;
    let row = db
        .query_one(
            "SELECT count(*) FILTER (WHERE step = 'payment' AND attempts = 2), count(*) FILTER (WHERE outcome = 'done'), \
                    (SELECT count(*) FROM order_status_history WHERE to_status = 'processed' AND changed_by = 'processor') \
             FROM order_steps",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)), (5, 10, 5));

    // ... and SIGTERM stops `ordercast process` cleanly.
    nix::sys::signal::kill(second.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = second.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "ordercast process did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

/// An order another writer marks `failed` while it is processed (`processing
/// -> failed` is allowed to every write path) keeps no payment and no
/// reservation: its steps are undone, by its processor at once, or by the
/// next one when its processor is gone. Before, the processor saw the order
/// leave `processing` and stopped, and the payment stayed charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_another_writer_fails_while_it_is_processed_gets_its_steps_undone() {
    let app = spawn_app().await;
    let fail = |id: i64| {
        let r = app.http.patch(app.url(&format!("/api/orders/{id}"))).json(&json!({"status": "failed"}));
        async move { assert_eq!(r.send().await.unwrap().status(), 200) }
    };

    // Its processor running: inventory waits for the test meanwhile.
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::WaitForRelease);
    let p = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    let id = app.create_order("Ada").await["id"].as_i64().unwrap();
    tokio::time::timeout(WAIT, inventory.entered.notified()).await.expect("inventory is called");
    fail(id).await;
    inventory.release.notify_one();
    let steps = all_four_finished(&app, id).await;
    undone_once(&steps, "done", (1, 1), &payment, &inventory, id);
    assert_eq!(wait_status(&app, id, "failed").await["status"], "failed");
    let db = app.sql().await;
    until(&db, &format!("SELECT count(*) FROM order_undo WHERE order_id = {id}"), |n| n == 0).await;
    p.task.abort();
    let _ = p.task.await;

    // Its processor gone: the failure is noted, and the next one undoes it.
    let payment = TestStep::new("payment", Mode::Succeed);
    let inventory = TestStep::new("inventory", Mode::EffectThenHang);
    let id = died_during(&app, [&payment, &inventory], &inventory).await;
    fail(id).await;
    let noted = format!("SELECT count(*) FROM order_undo WHERE order_id = {id}");
    assert_eq!(scalar::<i64>(&db, &noted).await, 1, "the failure in processing is noted");
    let second = start(&app.db_url, vec![payment.clone(), inventory.clone()]);
    let steps = both_compensated(&db, id).await;
    undone_once(&steps, "started", (1, 1), &payment, &inventory, id);
    assert_eq!(second.state.resumed.load(Ordering::Relaxed), 1);
    until(&db, &noted, |n| n == 0).await;
    // The processor's own failures are not noted: their steps are undone
    // before the status is set.
    let declined = TestStep::new("payment", Mode::Decline);
    let third = start(&app.db_url, vec![declined.clone(), TestStep::new("inventory", Mode::Succeed)]);
    second.task.abort();
    let _ = second.task.await;
    let id = app.create_order("Bo").await["id"].as_i64().unwrap();
    wait_status(&app, id, "failed").await;
    assert_eq!(scalar::<i64>(&db, &format!("SELECT count(*) FROM order_undo WHERE order_id = {id}")).await, 0);
    drop(third);
}
