//! The agent's end of the plugin's socket: accepts connections on
//! `<state dir>/cni.sock`, reads one request line each and hands it to the
//! agent's loop, which answers once the maps say so. Only root may connect
//! (the socket is 0600): the runtime runs the plugin as root.
use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use super::proto::{self, Reply, Request};

/// One request waiting for the agent's loop.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Reply>,
}

/// A peer that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests waiting for the loop; a runtime creating many pods at once
/// waits on the socket beyond this.
const QUEUE: usize = 64;

/// Binds the socket (replacing one an earlier agent left) and serves it
/// on the current tokio runtime.
pub fn serve(state_dir: &Path) -> Result<mpsc::Receiver<Call>> {
    let path = proto::socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing old {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    info!(socket = %path.display(), "serving meshlane-cni");
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(one(stream, tx.clone()));
                }
                Err(e) => {
                    warn!("accepting on the meshlane-cni socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(rx)
}

async fn one(stream: UnixStream, tx: mpsc::Sender<Call>) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd.take(proto::MAX_LINE));
    let read = rd.read_line(&mut line);
    let reply = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Err(_) => return,
        Ok(Err(e)) => Reply::Error {
            msg: format!("reading the request: {e}"),
        },
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply::Error {
                msg: format!("not a meshlane-cni request: {e}"),
            },
            Ok(request) => {
                let (reply, answer) = oneshot::channel();
                if tx.send(Call { request, reply }).await.is_err() {
                    return;
                }
                match answer.await {
                    Ok(r) => r,
                    Err(_) => return,
                }
            }
        },
    };
    let mut out = serde_json::to_string(&reply).expect("replies serialise");
    out.push('\n');
    let _ = wr.write_all(out.as_bytes()).await;
}
