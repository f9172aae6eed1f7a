//! `EventStream`: one request's events, as a `futures::Stream` for async callers and with
//! `blocking_next` for threads.
//!
//! Contract: the items follow `EngineEvent`'s order and end with exactly one `Finished` or
//! `Failed`, after which the stream yields `None`. If the engine thread vanished without a
//! terminal event, the stream makes one up (`Failed { reason: "engine_stopped" }`), so a caller
//! never waits forever. Dropping the stream before its end cancels the request: the engine
//! frees its blocks at its next step.

use std::pin::Pin;
use std::task::{Context, Poll};

use allam_types::{EngineEvent, RequestId};
use crossbeam_channel::Sender;
use futures::Stream;
use tokio::sync::mpsc::Receiver;

use crate::engine::Command;
use crate::failure_reason;

/// The events of one submitted request.
pub struct EventStream {
    request_id: RequestId,
    events: Receiver<EngineEvent>,
    commands: Sender<Command>,
    ended: bool,
}

impl EventStream {
    pub(crate) fn new(
        request_id: RequestId,
        events: Receiver<EngineEvent>,
        commands: Sender<Command>,
    ) -> EventStream {
        EventStream {
            request_id,
            events,
            commands,
            ended: false,
        }
    }

    /// The id the engine gave this request (for logs).
    pub fn request_id(&self) -> RequestId {
        self.request_id
    }

    /// Waits for the next event on the calling thread. Do not call it from async code (it
    /// parks the thread); use the `Stream` impl there.
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        futures::executor::block_on(futures::future::poll_fn(|cx| self.poll_event(cx)))
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<EngineEvent>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.events.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                if matches!(
                    event,
                    EngineEvent::Finished { .. } | EngineEvent::Failed { .. }
                ) {
                    self.ended = true;
                }
                Poll::Ready(Some(event))
            }
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(Some(EngineEvent::Failed {
                    reason: failure_reason::ENGINE_STOPPED,
                    message: "the engine stopped before the request finished".to_owned(),
                }))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Stream for EventStream {
    type Item = EngineEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<EngineEvent>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if !self.ended {
            // Never block here: if the channel is full the engine still sees the closed
            // receiver at its next step.
            let _ = self.commands.try_send(Command::Cancel(self.request_id));
        }
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream")
            .field("request_id", &self.request_id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}
