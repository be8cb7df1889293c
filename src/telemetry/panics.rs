//! A panic in a connection's task is never silent and never a flood: [`catch`] runs a task's future and
//! turns a panic into a value the caller counts and logs (one line, the message and where it happened), and
//! the hook that [`install_hook`] sets keeps the standard hook's message and backtrace out of the log for
//! panics caught that way. A panic anywhere else still goes to the standard hook.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::task::Poll;

thread_local! {
    /// Set while a future run by `catch` is being polled on this thread.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// What the hook saw of the last caught panic on this thread.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A caught panic: its message and location, on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked(pub String);

/// Installs the hook (once, at start-up; later calls add nothing).
pub fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let standard = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.get() {
                let line = info.to_string().replace('\n', " ");
                LAST.with(|last| *last.borrow_mut() = Some(line));
            } else {
                standard(info);
            }
        }));
    });
}

/// Clears the flag however the poll ends.
struct Catching;

impl Catching {
    fn enter() -> Self {
        CATCHING.set(true);
        Catching
    }
}

impl Drop for Catching {
    fn drop(&mut self) {
        CATCHING.set(false);
    }
}

/// Runs `future` to its end, or to a panic, which comes back as [`Panicked`] (the future is dropped then).
pub async fn catch<T>(future: impl Future<Output = T>) -> Result<T, Panicked> {
    let mut future = pin!(future);
    poll_fn(|cx| {
        let _catching = Catching::enter();
        match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => {
                let seen = LAST.with(|last| last.borrow_mut().take());
                let message = seen.unwrap_or_else(|| {
                    payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_owned())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into())
                });
                Poll::Ready(Err(Panicked(message)))
            }
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_after_a_wait_comes_back_as_one_line_and_the_flag_is_cleared() {
        install_hook();
        let ok = catch(async { 7 }).await;
        assert_eq!(ok, Ok(7));
        let caught = catch(async {
            tokio::task::yield_now().await;
            let index = std::hint::black_box(5usize);
            [1, 2, 3][index]
        })
        .await
        .unwrap_err();
        assert!(caught.0.contains("index out of bounds"), "{caught:?}");
        assert!(caught.0.contains("panics.rs"), "the location: {caught:?}");
        assert!(!caught.0.contains('\n'));
        assert!(!CATCHING.get(), "outside `catch` the standard hook reports panics");
    }
}
