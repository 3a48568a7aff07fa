//! Bundles over MQTT (PROTOCOL §6.2), for devices that can reach the broker but not the
//! controller's HTTP endpoint: a device asks for a range of a bundle file by its SHA-256,
//! and gets the pieces that cover it, each with its own digest, on its `chunks` topic.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use edgeloop_agent::now_ms;
use edgeloop_shared::protocol::{
    BundleChunk, BundleRequest, Envelope, MAX_BUNDLE_REQUEST_BYTES, Message,
};
use edgeloop_shared::topics::{Channel, Topics};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::registry::ArtifactStore;

/// Requests answered at once.
pub const MAX_SERVING: usize = 4;

/// The requests being answered: at most [`MAX_SERVING`] at once and one per device. A
/// request that comes while that is full is dropped (its device asks again after a
/// pause), so that devices flooding requests cannot make the controller read and send
/// without bound, nor one device take every place.
#[derive(Clone)]
pub struct Serving {
    places: Arc<Semaphore>,
    devices: Arc<Mutex<HashSet<String>>>,
}

impl Default for Serving {
    fn default() -> Self {
        Serving {
            places: Arc::new(Semaphore::new(MAX_SERVING)),
            devices: Arc::new(Mutex::new(HashSet::new())),
        }
    }
}

impl Serving {
    /// A place to answer `device`'s request, or `None` when all are taken or the device
    /// has one already.
    pub fn claim(&self, device: &str) -> Option<Claim> {
        let permit = self.places.clone().try_acquire_owned().ok()?;
        if !self
            .devices
            .lock()
            .expect("serving lock")
            .insert(device.to_string())
        {
            return None;
        }
        Some(Claim {
            _permit: permit,
            devices: self.devices.clone(),
            device: device.to_string(),
        })
    }
}

/// One place taken in [`Serving`], given back when dropped.
pub struct Claim {
    _permit: OwnedSemaphorePermit,
    devices: Arc<Mutex<HashSet<String>>>,
    device: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.devices
            .lock()
            .expect("serving lock")
            .remove(&self.device);
    }
}

/// Answers one request: the pieces of the range it asks for, or one piece saying why there
/// are none. Pieces go at QoS 0: a device that misses one asks again, and a device that is
/// offline does not have a backlog of stale pieces queued for it at the broker. `_claim`
/// is held until the pieces are handed to the client.
pub async fn serve(
    artifacts: ArtifactStore,
    client: AsyncClient,
    topics: Topics,
    device_id: String,
    request: BundleRequest,
    _claim: Claim,
) {
    let Ok(topic) = topics.device(&device_id, Channel::Chunks) else {
        return;
    };
    let sha256 = request.bundle_sha256.clone();
    let chunks = tokio::task::spawn_blocking(move || read_range(&artifacts, &request))
        .await
        .unwrap_or_else(|e| Err(format!("reading the bundle failed: {e}")))
        .unwrap_or_else(|reason| {
            warn!(device = %device_id, bundle = %sha256, %reason, "cannot serve a bundle request");
            vec![BundleChunk::failed(&sha256, reason)]
        });
    debug!(device = %device_id, bundle = %sha256, pieces = chunks.len(), "serving bundle pieces");
    for chunk in chunks {
        let envelope = Envelope::new(
            device_id.as_str(),
            uuid::Uuid::now_v7().to_string(),
            now_ms(),
            Message::BundleChunk(chunk),
        );
        if let Err(e) = client
            .publish(&topic, QoS::AtMostOnce, false, envelope.encode())
            .await
        {
            warn!(device = %device_id, error = %e, "cannot send a bundle piece");
            return;
        }
    }
}

/// The pieces of the requested range of the bundle file with that digest.
fn read_range(
    artifacts: &ArtifactStore,
    request: &BundleRequest,
) -> Result<Vec<BundleChunk>, String> {
    let sha256 = &request.bundle_sha256;
    if request.length == 0 || request.length > MAX_BUNDLE_REQUEST_BYTES {
        return Err(format!(
            "a request asks for 1 to {MAX_BUNDLE_REQUEST_BYTES} bytes, not {}",
            request.length
        ));
    }
    let path = artifacts
        .find(sha256)
        .map_err(|e| format!("cannot look for the bundle: {e}"))?
        .ok_or_else(|| format!("no bundle has SHA-256 {sha256}"))?;
    let mut file =
        std::fs::File::open(&path).map_err(|e| format!("cannot open the bundle: {e}"))?;
    let total = file
        .metadata()
        .map_err(|e| format!("cannot read the bundle: {e}"))?
        .len();
    if request.offset >= total {
        return Err(format!(
            "offset {} is past the end of the bundle ({total} bytes)",
            request.offset
        ));
    }
    let length = request.length.min(total - request.offset);
    let mut bytes = vec![0; length as usize];
    file.seek(SeekFrom::Start(request.offset))
        .and_then(|_| file.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read the bundle: {e}"))?;
    Ok(BundleChunk::cut(sha256, &bytes, request.offset, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_shared::protocol::BUNDLE_CHUNK_BYTES;

    #[test]
    fn requests_are_answered_a_few_at_a_time_and_one_per_device() {
        let serving = Serving::default();
        let first = serving.claim("d1").unwrap();
        assert!(serving.claim("d1").is_none(), "one per device");
        let mut others: Vec<Claim> = (2..=MAX_SERVING)
            .map(|i| serving.claim(&format!("d{i}")).unwrap())
            .collect();
        assert!(serving.claim("late").is_none(), "all places taken");
        drop(first);
        assert!(serving.claim("d1").is_some(), "its place is free again");
        others.pop();
        assert!(serving.claim("late").is_some());
    }

    #[test]
    fn a_request_gets_the_pieces_of_its_range_or_the_reason_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = ArtifactStore::new(dir.path().to_path_buf());
        let bundle: Vec<u8> = (0..(3 * BUNDLE_CHUNK_BYTES + 7) as u32)
            .map(|i| (i % 253) as u8)
            .collect();
        let sha = edgeloop_shared::sha256_hex(&bundle);
        let path = artifacts.path("vibration", 2, &sha);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &bundle).unwrap();
        let request = |offset: u64, length: u64| BundleRequest {
            bundle_sha256: sha.clone(),
            offset,
            length,
        };

        let pieces = read_range(&artifacts, &request(5, MAX_BUNDLE_REQUEST_BYTES)).unwrap();
        assert_eq!(pieces.len(), 4, "the rest of the file, cut in pieces");
        let joined: Vec<u8> = pieces.iter().flat_map(|p| p.bytes().unwrap()).collect();
        assert_eq!(joined, bundle[5..]);
        assert!(pieces.iter().all(|p| p.total_size == bundle.len() as u64));
        let one = read_range(&artifacts, &request(100, 10)).unwrap();
        assert_eq!(one[0].bytes().unwrap(), bundle[100..110]);

        let refused = |r: BundleRequest| read_range(&artifacts, &r).unwrap_err();
        assert!(refused(request(bundle.len() as u64, 10)).contains("past the end"));
        assert!(refused(request(0, MAX_BUNDLE_REQUEST_BYTES + 1)).contains("1 to"));
        assert!(refused(request(0, 0)).contains("1 to"));
        let unknown = BundleRequest {
            bundle_sha256: "ab".repeat(32),
            ..request(0, 10)
        };
        assert!(refused(unknown).contains("no bundle"));
        for hostile in ["../../etc/passwd", "*", &"AB".repeat(32)] {
            let r = BundleRequest {
                bundle_sha256: hostile.to_string(),
                ..request(0, 10)
            };
            assert!(refused(r).contains("SHA-256"), "{hostile}");
        }
    }
}
