//! Bundles over MQTT (PROTOCOL §6.2): for a device that reaches the broker but not the
//! controller's HTTP endpoint, the installer asks for a bundle a window of pieces at a
//! time, and the agent actor hands it the pieces that arrive on the device's `chunks`
//! topic. Each piece carries its own SHA-256; the bytes then go through the same streaming
//! checks as an HTTP download.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeloop_shared::protocol::{BundleChunk, BundleRequest};
use tokio::sync::mpsc;

/// How long a transfer waits for the next piece before asking again.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests in a row that bring nothing before the transfer gives up (the download resumes
/// from what arrived at the next attempt).
pub const MAX_STALLS: u32 = 6;
/// Pieces that may wait between the actor and the transfer.
const QUEUE: usize = 16;

/// How requests leave: queued in the outbox by the agent, or a fake in tests.
pub type SendRequest = Arc<dyn Fn(BundleRequest) + Send + Sync>;

/// The transfer under way: the bundle it wants and where its pieces go.
type Waiting = Option<(String, mpsc::Sender<BundleChunk>)>;

/// The way between the installer's transfer and the agent actor. Cheap to clone.
#[derive(Clone)]
pub struct Pieces {
    send: SendRequest,
    waiting: Arc<Mutex<Waiting>>,
}

impl std::fmt::Debug for Pieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.waiting.lock().expect("pieces lock");
        f.debug_struct("Pieces")
            .field("waiting_for", &waiting.as_ref().map(|(sha256, _)| sha256))
            .finish()
    }
}

impl Pieces {
    pub fn new(send: SendRequest) -> Self {
        Pieces {
            send,
            waiting: Arc::new(Mutex::new(None)),
        }
    }

    /// A piece that arrived: handed to the transfer that wants it. Pieces of other bundles
    /// (an abandoned transfer's, another device's replica's) are dropped; false then.
    pub fn deliver(&self, chunk: BundleChunk) -> bool {
        let waiting = self.waiting.lock().expect("pieces lock");
        match waiting.as_ref() {
            Some((sha256, tx)) if *sha256 == chunk.bundle_sha256 => tx.try_send(chunk).is_ok(),
            _ => false,
        }
    }

    /// Starts taking the pieces of the bundle with this digest; one transfer at a time.
    pub fn open(&self, sha256: &str) -> Receiving {
        let (tx, rx) = mpsc::channel(QUEUE);
        *self.waiting.lock().expect("pieces lock") = Some((sha256.to_string(), tx));
        Receiving {
            pieces: self.clone(),
            rx,
        }
    }

    /// Asks the controller for `length` bytes of the bundle from `offset`.
    pub fn request(&self, sha256: &str, offset: u64, length: u64) {
        (self.send)(BundleRequest {
            bundle_sha256: sha256.to_string(),
            offset,
            length,
        });
    }
}

/// The pieces of one transfer; dropping it stops taking them.
pub struct Receiving {
    pieces: Pieces,
    pub rx: mpsc::Receiver<BundleChunk>,
}

impl Drop for Receiving {
    fn drop(&mut self) {
        *self.pieces.waiting.lock().expect("pieces lock") = None;
    }
}
