//! Single-flight: concurrent misses of one key in one process share one fill.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

/// Fills in flight by key.
pub struct SingleFlight<V> {
    flights: Mutex<HashMap<String, Arc<OnceCell<V>>>>,
}

impl<V> Default for SingleFlight<V> {
    fn default() -> Self {
        Self { flights: Mutex::new(HashMap::new()) }
    }
}

impl<V: Clone> SingleFlight<V> {
    /// Runs `fill` for `key` unless a fill of `key` is running, in which case
    /// waits for its result. Returns the value and whether this call ran the
    /// fill. If the running fill is cancelled, a waiter takes over; with no
    /// waiter, its entry goes.
    pub async fn run<F, Fut>(&self, key: &str, fill: F) -> (V, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let cell = {
            let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
            flights.entry(key.to_string()).or_default().clone()
        };
        let mut guard = Leave { flights: self, key, cell, ran: false };
        let mut ran = false;
        let value = guard
            .cell
            .get_or_init(|| {
                ran = true;
                fill()
            })
            .await
            .clone();
        guard.ran = ran;
        (value, ran)
    }

    /// Keys with a fill in flight.
    pub fn in_flight(&self) -> usize {
        self.flights.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Removes a flight's entry when its call ends: the call that ran the fill
/// removes it; a cancelled call removes it when nobody else waits on it (a
/// waiter would take the fill over, and remove it when done).
struct Leave<'a, V> {
    flights: &'a SingleFlight<V>,
    key: &'a str,
    cell: Arc<OnceCell<V>>,
    ran: bool,
}

impl<V> Drop for Leave<'_, V> {
    fn drop(&mut self) {
        let mut flights = self.flights.flights.lock().unwrap_or_else(|p| p.into_inner());
        // Callers clone the cell under this lock: two references (the map's
        // and ours) mean no other caller waits on it.
        let abandoned = !self.cell.initialized() && Arc::strong_count(&self.cell) == 2;
        if (self.ran || abandoned) && flights.get(self.key).is_some_and(|c| Arc::ptr_eq(c, &self.cell)) {
            flights.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn concurrent_calls_share_one_fill_and_later_calls_fill_again() {
        let flight = Arc::new(SingleFlight::<u32>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (flight, runs) = (flight.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                flight
                    .run("k", || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        7
                    })
                    .await
            }));
        }
        let mut leaders = 0;
        for t in tasks {
            let (v, ran) = t.await.unwrap();
            assert_eq!(v, 7);
            leaders += usize::from(ran);
        }
        assert_eq!((runs.load(Ordering::SeqCst), leaders), (1, 1));
        let (v, ran) = flight.run("k", || async { 8 }).await;
        assert_eq!((v, ran), (8, true));
        assert_eq!(flight.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_fill_leaves_no_entry_behind() {
        let flight = Arc::new(SingleFlight::<u32>::default());
        let task = tokio::spawn({
            let flight = flight.clone();
            async move { flight.run("k", std::future::pending::<u32>).await }
        });
        while flight.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(flight.in_flight(), 0, "the cancelled fill's entry stayed in the map");

        // A waiter takes over a cancelled fill, and then leaves nothing either.
        let first = tokio::spawn({
            let flight = flight.clone();
            async move { flight.run("k", std::future::pending::<u32>).await }
        });
        while flight.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let flight = flight.clone();
            async move { flight.run("k", || async { 9 }).await }
        });
        tokio::task::yield_now().await;
        first.abort();
        assert_eq!(second.await.unwrap().0, 9);
        assert_eq!(flight.in_flight(), 0);
    }
}
