//! The `Admin` service. Every call has passed the [`super::auth::Authorize`]
//! interceptor (an admin certificate whose name is not revoked); a
//! mutating call takes the admin's identity from the request with
//! [`caller`], logs it, and records it with what it changes: a reason is
//! stored as "<reason> (by admin <name>)", or "by admin <name>" when none
//! was given (the state it explains already names what happened).

use std::sync::Arc;

use common::ids::{AgentId, TaskId};
use common::proto::{self, AgentInfo, admin_server};
use common::protocol;
use common::tls::PeerIdentity;
use common::types::TaskSpec;
use tonic::{Request, Response, Status};
use tracing::info;

use super::auth::caller;
use super::convert::{admin_info, agent_info, task_info};
use super::watch::{self, ClusterStream, WatchStream};
use crate::core::{AdminError, NewTask, TaskError, TaskSource, TaskState, TaskTriage};
use crate::driver::{Command, DriverHandle, TaskQuery};
use crate::store::Store;
use crate::triage::{self, Rules};

pub struct Admin {
    driver: DriverHandle,
    store: Arc<dyn Store>,
    rules: Arc<Rules>,
}

impl Admin {
    pub fn new(driver: DriverHandle, store: Arc<dyn Store>, rules: Arc<Rules>) -> Self {
        Self {
            driver,
            store,
            rules,
        }
    }
}

impl From<AdminError> for Status {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::UnknownAgent(id) => Status::not_found(format!("no agent named {id}")),
            AdminError::NotConnected(id) => {
                Status::failed_precondition(format!("agent {id} is not connected"))
            }
            AdminError::Revoked(id) => Status::failed_precondition(format!(
                "agent {id} is revoked (unrevoke it first with `ccc unrevoke {id}`)"
            )),
            AdminError::NotDrained(id) => {
                Status::failed_precondition(format!("agent {id} is not drained by an admin"))
            }
            AdminError::NotRevoked(id) => {
                Status::failed_precondition(format!("agent {id} is not revoked"))
            }
            AdminError::Connected(id) => Status::failed_precondition(format!(
                "agent {id} is connected: stop it before forgetting it"
            )),
            AdminError::HoldsTasks(id, tasks) => Status::failed_precondition(format!(
                "agent {id} holds {}: cancel them or wait for their leases to run out",
                tasks
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            AdminError::UnknownAdmin(name) => {
                Status::not_found(format!("admin {name} is not revoked"))
            }
            AdminError::OwnName(name) => Status::invalid_argument(format!(
                "admin {name} cannot revoke its own certificate: ask another admin"
            )),
            AdminError::InvalidName(why) => Status::invalid_argument(format!("name: {why}")),
        }
    }
}

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Self {
        match e {
            TaskError::Unknown(id) => Status::not_found(format!("no task {id}")),
            TaskError::AlreadyFinished(id, state) => {
                Status::failed_precondition(format!("task {id} is already {}", state.as_str()))
            }
            TaskError::NotFinished(id, state) => Status::failed_precondition(format!(
                "task {id} is {}: only failed or cancelled tasks can be retried",
                state.as_str()
            )),
        }
    }
}

pub fn task_id(raw: &str) -> Result<TaskId, Status> {
    raw.parse::<TaskId>()
        .map_err(|e| Status::invalid_argument(format!("task_id: {e}")))
}

fn task_state_from_proto(value: i32) -> Result<Option<TaskState>, Status> {
    use proto::TaskState as P;
    Ok(match P::try_from(value) {
        Ok(P::Unspecified) => None,
        Ok(P::NeedsInfo) => Some(TaskState::NeedsInfo),
        Ok(P::Queued) => Some(TaskState::Queued),
        Ok(P::Assigned) => Some(TaskState::Assigned),
        Ok(P::Running) => Some(TaskState::Running),
        Ok(P::Finishing) => Some(TaskState::Finishing),
        Ok(P::Succeeded) => Some(TaskState::Succeeded),
        Ok(P::Failed) => Some(TaskState::Failed),
        Ok(P::Cancelled) => Some(TaskState::Cancelled),
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "unknown task state {value}"
            )));
        }
    })
}

fn agent_id(raw: &str) -> Result<AgentId, Status> {
    AgentId::new(raw).map_err(|e| Status::invalid_argument(format!("agent_id: {e}")))
}

#[tonic::async_trait]
impl admin_server::Admin for Admin {
    type WatchTaskStream = WatchStream;
    type WatchClusterStream = ClusterStream;

    async fn watch_cluster(
        &self,
        req: Request<proto::WatchClusterRequest>,
    ) -> Result<Response<Self::WatchClusterStream>, Status> {
        let stream = watch::watch_cluster(&self.driver, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn undrain_agent(
        &self,
        req: Request<proto::UndrainAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = caller(&req)?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        info!(admin = %admin.name, agent_id = %agent, "undrain requested");
        let view = self
            .driver
            .call(|reply| Command::Undrain { agent, reply })
            .await??;
        Ok(Response::new(agent_info(view)))
    }

    async fn unrevoke_agent(
        &self,
        req: Request<proto::UnrevokeAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = caller(&req)?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        info!(admin = %admin.name, agent_id = %agent, "unrevoke requested");
        let view = self
            .driver
            .call(|reply| Command::Unrevoke { agent, reply })
            .await??;
        Ok(Response::new(agent_info(view)))
    }

    async fn forget_agent(
        &self,
        req: Request<proto::ForgetAgentRequest>,
    ) -> Result<Response<proto::ForgetAgentResponse>, Status> {
        let admin = caller(&req)?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        info!(admin = %admin.name, agent_id = %agent, "forget requested");
        self.driver
            .call(|reply| Command::Forget { agent, reply })
            .await??;
        Ok(Response::new(proto::ForgetAgentResponse {}))
    }

    async fn list_admins(
        &self,
        _req: Request<proto::ListAdminsRequest>,
    ) -> Result<Response<proto::ListAdminsResponse>, Status> {
        let admins = self
            .driver
            .call(|reply| Command::ListAdmins { reply })
            .await?;
        Ok(Response::new(proto::ListAdminsResponse {
            admins: admins.iter().map(admin_info).collect(),
        }))
    }

    async fn revoke_admin(
        &self,
        req: Request<proto::RevokeAdminRequest>,
    ) -> Result<Response<proto::AdminInfo>, Status> {
        let admin = caller(&req)?;
        let name = req.get_ref().name.clone();
        let reason = reason_by(&req.get_ref().reason, admin);
        info!(admin = %admin.name, name = %name, %reason, "admin revoke requested");
        let record = self
            .driver
            .call(|reply| Command::RevokeAdmin {
                name,
                reason,
                by: admin.name.clone(),
                reply,
            })
            .await??;
        Ok(Response::new(admin_info(&record)))
    }

    async fn unrevoke_admin(
        &self,
        req: Request<proto::UnrevokeAdminRequest>,
    ) -> Result<Response<proto::AdminInfo>, Status> {
        let admin = caller(&req)?;
        let name = req.get_ref().name.clone();
        info!(admin = %admin.name, name = %name, "admin unrevoke requested");
        let record = self
            .driver
            .call(|reply| Command::UnrevokeAdmin { name, reply })
            .await??;
        Ok(Response::new(admin_info(&record)))
    }

    async fn submit_task(
        &self,
        req: Request<proto::SubmitTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let admin = caller(&req)?.clone();
        let task = new_task(req.into_inner(), &admin, &self.rules)?;
        let task = self
            .driver
            .call(|reply| Command::Submit { task, reply })
            .await?;
        Ok(Response::new(task_info(&task)))
    }

    async fn list_tasks(
        &self,
        req: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let req = req.into_inner();
        let query = TaskQuery {
            state: task_state_from_proto(req.state)?,
            specialty: if req.specialty == 0 {
                None
            } else {
                Some(
                    protocol::specialty_from_proto(req.specialty)
                        .map_err(|e| Status::invalid_argument(e.to_string()))?,
                )
            },
            agent: if req.agent_id.is_empty() {
                None
            } else {
                Some(agent_id(&req.agent_id)?)
            },
            repo: (!req.repo.is_empty()).then_some(req.repo),
            outcome: if req.outcome.is_empty() {
                None
            } else {
                Some(outcome_from_word(&req.outcome)?)
            },
            newest_first: req.newest_first,
            after: if req.page_token.is_empty() {
                None
            } else {
                Some(
                    task_id(&req.page_token)
                        .map_err(|_| Status::invalid_argument("bad page_token"))?,
                )
            },
            limit: match req.page_size {
                0 => 100,
                n => usize::try_from(n.min(1000)).unwrap_or(1000),
            },
        };
        let page = self
            .driver
            .call(|reply| Command::ListTasks { query, reply })
            .await?;
        let next_page_token = if page.more {
            page.tasks
                .last()
                .map(|t| t.id.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(proto::ListTasksResponse {
            tasks: page.tasks.iter().map(task_info).collect(),
            next_page_token,
            total: u64::try_from(page.total).unwrap_or(u64::MAX),
        }))
    }

    async fn get_task(
        &self,
        req: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let id = task_id(&req.get_ref().task_id)?;
        let task = self
            .driver
            .call(|reply| Command::GetTask { task: id, reply })
            .await?
            .ok_or(TaskError::Unknown(id))?;
        Ok(Response::new(task_info(&task)))
    }

    async fn watch_task(
        &self,
        req: Request<proto::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let stream = watch::watch_task(&self.driver, &self.store, req.into_inner()).await?;
        Ok(Response::new(stream))
    }

    async fn cancel_task(
        &self,
        req: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let admin = caller(&req)?;
        let id = task_id(&req.get_ref().task_id)?;
        let reason = reason_by(&req.get_ref().reason, admin);
        let task = self
            .driver
            .call(|reply| Command::Cancel {
                task: id,
                reason,
                reply,
            })
            .await??;
        info!(admin = %admin.name, task_id = %id, attempt = task.attempt_number(), "cancel requested by an admin");
        Ok(Response::new(task_info(&task)))
    }

    async fn retry_task(
        &self,
        req: Request<proto::RetryTaskRequest>,
    ) -> Result<Response<proto::TaskInfo>, Status> {
        let admin = caller(&req)?;
        let id = task_id(&req.get_ref().task_id)?;
        let reason = reason_by("retried", admin);
        let task = self
            .driver
            .call(|reply| Command::Retry {
                task: id,
                reason,
                reply,
            })
            .await??;
        info!(admin = %admin.name, task_id = %id, attempt = task.attempt_number(), "retry requested by an admin");
        Ok(Response::new(task_info(&task)))
    }

    async fn list_agents(
        &self,
        _req: Request<proto::ListAgentsRequest>,
    ) -> Result<Response<proto::ListAgentsResponse>, Status> {
        let agents = self
            .driver
            .call(|reply| Command::ListAgents { reply })
            .await?;
        Ok(Response::new(proto::ListAgentsResponse {
            agents: agents.into_iter().map(agent_info).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<proto::GetAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let agent = agent_id(&req.get_ref().agent_id)?;
        let view = self
            .driver
            .call(|reply| Command::GetAgent {
                agent: agent.clone(),
                reply,
            })
            .await?
            .ok_or_else(|| Status::from(AdminError::UnknownAgent(agent)))?;
        Ok(Response::new(agent_info(view)))
    }

    async fn revoke_agent(
        &self,
        req: Request<proto::RevokeAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = caller(&req)?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        let reason = reason_by(&req.get_ref().reason, admin);
        info!(admin = %admin.name, agent_id = %agent, %reason, "revoke requested");
        let view = self
            .driver
            .call(|reply| Command::Revoke {
                agent,
                reason,
                reply,
            })
            .await??;
        Ok(Response::new(agent_info(view)))
    }

    async fn drain_agent(
        &self,
        req: Request<proto::DrainAgentRequest>,
    ) -> Result<Response<AgentInfo>, Status> {
        let admin = caller(&req)?;
        let agent = agent_id(&req.get_ref().agent_id)?;
        let reason = reason_by(&req.get_ref().reason, admin);
        info!(admin = %admin.name, agent_id = %agent, %reason, "drain requested");
        let view = self
            .driver
            .call(|reply| Command::Drain {
                agent,
                reason,
                reply,
            })
            .await??;
        Ok(Response::new(agent_info(view)))
    }
}

/// The admin's reason, bounded, with who gave it; only who gave it when
/// no reason was given (the state it explains already says what happened).
fn reason_by(given: &str, admin: &PeerIdentity) -> String {
    let text: String = given
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.trim().is_empty() {
        format!("by admin {}", admin.name)
    } else {
        format!("{} (by admin {})", text.trim(), admin.name)
    }
}

/// An outcome given as a word (`tests_failed`), as `ccc tasks --outcome` sends it.
fn outcome_from_word(word: &str) -> Result<common::types::Outcome, Status> {
    serde_json::from_value(serde_json::Value::String(word.to_owned())).map_err(|_| {
        Status::invalid_argument(format!(
            "unknown outcome {word:?} (succeeded, tests_failed, no_changes, cli_failed, ...; see `ccc tasks --help`)"
        ))
    })
}

fn new_task(
    req: proto::SubmitTaskRequest,
    admin: &PeerIdentity,
    rules: &Rules,
) -> Result<NewTask, Status> {
    let field = |name: &str, value: &str, max: usize, required: bool| -> Result<(), Status> {
        if required && value.trim().is_empty() {
            return Err(Status::invalid_argument(format!("{name} is required")));
        }
        if value.len() > max {
            return Err(Status::invalid_argument(format!(
                "{name} is longer than {max} bytes"
            )));
        }
        Ok(())
    };
    field("repo", &req.repo, 2048, true)?;
    field("title", &req.title, 512, true)?;
    field("body", &req.body, 256 * 1024, false)?;
    field("base_branch", &req.base_branch, 256, false)?;
    field("test_command", &req.test_command, 4096, false)?;
    field("follow_up_branch", &req.follow_up_branch, 256, false)?;
    let invalid =
        |name: &str, e: &dyn std::fmt::Display| Status::invalid_argument(format!("{name}: {e}"));
    common::repo::check_repo_url(&req.repo).map_err(|e| invalid("repo", &e))?;
    if !req.base_branch.is_empty() {
        common::repo::check_branch(&req.base_branch).map_err(|e| invalid("base_branch", &e))?;
    }
    let follow_up = !req.follow_up_branch.is_empty();
    if follow_up {
        common::repo::check_branch(&req.follow_up_branch)
            .map_err(|e| invalid("follow_up_branch", &e))?;
    }
    if req.technologies.len() > 32 {
        return Err(Status::invalid_argument("at most 32 technologies"));
    }
    let given = if req.specialty == 0 {
        None
    } else {
        Some(
            protocol::specialty_from_proto(req.specialty)
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        )
    };
    // Every task is triaged; the submitter's specialty, when given, wins.
    let result = triage::triage(
        &triage::Issue {
            title: &req.title,
            body: &req.body,
            labels: &[],
            languages: &[],
        },
        rules,
    );
    let specialty = given.unwrap_or(result.specialty);
    let mut technologies: Vec<String> = req
        .technologies
        .into_iter()
        .map(|t| protocol::bounded(t, 64))
        .collect();
    for tech in &result.technologies {
        if !technologies.iter().any(|t| t.eq_ignore_ascii_case(tech)) {
            technologies.push(tech.clone());
        }
    }
    Ok(NewTask {
        source: TaskSource::Manual {
            submitted_by: admin.name.clone(),
        },
        spec: TaskSpec {
            repo_url: req.repo,
            base_branch: req.base_branch,
            issue_number: req.issue_number,
            title: req.title,
            body: req.body,
            issue_url: String::new(),
            author: admin.name.clone(),
            labels: Vec::new(),
            specialty,
            technologies,
            branch: req.follow_up_branch,
            follow_up,
            test_command: req.test_command,
        },
        priority: req.priority.clamp(-1000, 1000),
        needs_info: false,
        triage: Some(TaskTriage {
            result,
            specialty_given: given.is_some(),
        }),
    })
}
