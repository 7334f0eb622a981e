//! The API's client side: one request, one reply, over the Unix socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use super::Request;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the API socket {path}: {source} (is `vmm run --api-socket` running?)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("API connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VM closed the API connection without answering")]
    NoReply,
    #[error("encoding the request: {0}")]
    Encode(#[source] serde_json::Error),
    /// `answer` is the line as received.
    #[error("the API answered something that is not JSON: {answer}")]
    BadReply {
        answer: String,
        #[source]
        source: serde_json::Error,
    },
}

pub struct Client {
    out: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let out = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let reader = BufReader::new(out.try_clone()?);
        Ok(Client { out, reader })
    }

    pub fn call(&mut self, req: &Request) -> Result<Value, ClientError> {
        let mut line = serde_json::to_string(req).map_err(ClientError::Encode)?;
        line.push('\n');
        self.out.write_all(line.as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(ClientError::NoReply);
        }
        serde_json::from_str(answer.trim())
            .map_err(|source| ClientError::BadReply { answer, source })
    }
}
