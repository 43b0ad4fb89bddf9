//! The toolstack's part: creating and removing device directories.

use xs_wire::{Access, Client, ClientError, Perm, TxId};

use xen_bus::XenbusState;

use crate::host::DomId;

/// One device as the toolstack configures it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Backend type (`backend/<kind>`), e.g. `vbd` or `qdisk`.
    pub kind: String,
    /// Frontend type (`device/<frontend_kind>`), e.g. `vbd`.
    pub frontend_kind: String,
    /// The backend's domain.
    pub backend: DomId,
    /// The guest.
    pub frontend: DomId,
    /// Device id.
    pub devid: u32,
    /// Extra nodes of the backend directory (e.g. `params`).
    pub backend_nodes: Vec<(String, String)>,
    /// Extra nodes of the frontend directory (e.g. `virtual-device`).
    pub frontend_nodes: Vec<(String, String)>,
}

impl DeviceSpec {
    /// A device whose frontend type equals its backend type, no extra nodes.
    pub fn new(kind: &str, backend: DomId, frontend: DomId, devid: u32) -> Self {
        DeviceSpec {
            kind: kind.to_string(),
            frontend_kind: kind.to_string(),
            backend,
            frontend,
            devid,
            backend_nodes: Vec::new(),
            frontend_nodes: Vec::new(),
        }
    }

    /// `/local/domain/<backend>/backend/<kind>/<frontend>/<devid>`.
    pub fn backend_path(&self) -> String {
        format!("/local/domain/{}/backend/{}/{}/{}", self.backend, self.kind, self.frontend, self.devid)
    }

    /// `/local/domain/<frontend>/device/<frontend_kind>/<devid>`.
    pub fn frontend_path(&self) -> String {
        format!("/local/domain/{}/device/{}/{}", self.frontend, self.frontend_kind, self.devid)
    }
}

/// The toolstack (dom0's connection).
#[derive(Clone, Debug)]
pub struct Toolstack {
    xs: Client,
}

impl Toolstack {
    /// Acts through `xs`, a privileged connection.
    pub fn new(xs: Client) -> Self {
        Toolstack { xs }
    }

    /// The connection.
    pub fn xenstore(&self) -> &Client {
        &self.xs
    }

    /// Creates both directories in one transaction, as libxl's
    /// `libxl__device_generic_add`: the frontend directory owned by the
    /// guest and readable by the backend, the backend directory owned by the
    /// backend domain and readable by the guest.
    pub fn create(&self, spec: &DeviceSpec) -> Result<(), ClientError> {
        let fe = spec.frontend_path();
        let be = spec.backend_path();
        let fe_perms = [Perm::new(Access::None, spec.frontend.into()), Perm::new(Access::Read, spec.backend.into())];
        let be_perms = [Perm::new(Access::None, spec.backend.into()), Perm::new(Access::Read, spec.frontend.into())];
        let mut fe_nodes = vec![
            ("backend".to_string(), be.clone()),
            ("backend-id".to_string(), spec.backend.to_string()),
            ("state".to_string(), XenbusState::Initialising.as_u32().to_string()),
        ];
        fe_nodes.extend(spec.frontend_nodes.iter().cloned());
        let mut be_nodes = vec![
            ("frontend".to_string(), fe.clone()),
            ("frontend-id".to_string(), spec.frontend.to_string()),
            ("online".to_string(), "1".to_string()),
            ("state".to_string(), XenbusState::Initialising.as_u32().to_string()),
        ];
        be_nodes.extend(spec.backend_nodes.iter().cloned());
        self.xs.transaction(|tx| {
            for (dir, perms, nodes) in [(&fe, &fe_perms, &fe_nodes), (&be, &be_perms, &be_nodes)] {
                self.xs.rm(tx, dir).or_else(ignore_enoent)?;
                self.xs.mkdir(tx, dir)?;
                self.xs.set_perms(tx, dir, perms)?;
                for (node, value) in nodes {
                    let path = format!("{dir}/{node}");
                    self.xs.write(tx, &path, value.as_bytes())?;
                    self.xs.set_perms(tx, &path, perms)?;
                }
            }
            Ok(())
        })
    }

    /// Removes the backend directory only (a forced detach while connected).
    pub fn remove_backend(&self, spec: &DeviceSpec) -> Result<(), ClientError> {
        self.xs.rm(TxId::NONE, &spec.backend_path()).or_else(ignore_enoent)
    }

    /// Removes both directories.
    pub fn remove(&self, spec: &DeviceSpec) -> Result<(), ClientError> {
        self.xs.transaction(|tx| {
            self.xs.rm(tx, &spec.backend_path()).or_else(ignore_enoent)?;
            self.xs.rm(tx, &spec.frontend_path()).or_else(ignore_enoent)
        })
    }

    /// Writes a node of the backend directory (e.g. `online = 0`).
    pub fn write_backend(&self, spec: &DeviceSpec, node: &str, value: &str) -> Result<(), ClientError> {
        self.xs.write(TxId::NONE, &format!("{}/{node}", spec.backend_path()), value.as_bytes())
    }

    /// Reads a node of the backend directory (`None` if absent).
    pub fn read_backend(&self, spec: &DeviceSpec, node: &str) -> Result<Option<String>, ClientError> {
        read_opt(&self.xs, &format!("{}/{node}", spec.backend_path()))
    }

    /// Reads the backend's state (`None` if absent or not a state).
    pub fn backend_state(&self, spec: &DeviceSpec) -> Result<Option<XenbusState>, ClientError> {
        Ok(self.read_backend(spec, "state")?.and_then(|s| XenbusState::parse(s.as_bytes())))
    }

    /// The error node Linux's `xenbus_dev_fatal` writes for this device:
    /// `/local/domain/<backend>/error/backend/<kind>/<fe>/<devid>/error`.
    pub fn linux_error(&self, spec: &DeviceSpec) -> Result<Option<String>, ClientError> {
        let path = format!(
            "/local/domain/{}/error/backend/{}/{}/{}/error",
            spec.backend, spec.kind, spec.frontend, spec.devid
        );
        read_opt(&self.xs, &path)
    }
}

pub(crate) fn ignore_enoent(e: ClientError) -> Result<(), ClientError> {
    if e.errno() == Some(xs_wire::XsErrno::ENOENT) {
        Ok(())
    } else {
        Err(e)
    }
}

pub(crate) fn read_opt(xs: &Client, path: &str) -> Result<Option<String>, ClientError> {
    match xs.read(TxId::NONE, path) {
        Ok(v) => Ok(Some(String::from_utf8_lossy(&v).trim_end_matches('\0').to_string())),
        Err(e) if e.errno() == Some(xs_wire::XsErrno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_follow_libxl_layout() {
        let mut spec = DeviceSpec::new("qdisk", 0, 5, 51712);
        spec.frontend_kind = "vbd".into();
        assert_eq!(spec.backend_path(), "/local/domain/0/backend/qdisk/5/51712");
        assert_eq!(spec.frontend_path(), "/local/domain/5/device/vbd/51712");
    }
}
