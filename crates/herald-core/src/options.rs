//! Channel options and their resolution from namespaces (PROTOCOL.md sections 1 and 5).

use std::collections::HashMap;
use std::time::Duration;

use herald_broker::PublishOptions;
use herald_protocol::ChannelName;

/// The options of every channel in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelOptions {
    /// Publications kept per channel; 0 = no history and no offsets.
    pub history_size: usize,
    /// A channel idle for longer loses its history and starts a new epoch.
    pub history_ttl: Duration,
    /// Slow consumers get only the newest pending publication per channel.
    pub conflate: bool,
    /// Clients may use the `publish` op.
    pub client_publish: bool,
    /// Anonymous connections may subscribe.
    pub anonymous_subscribe: bool,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            history_size: 0,
            history_ttl: Duration::from_secs(300),
            conflate: false,
            client_publish: false,
            anonymous_subscribe: true,
        }
    }
}

impl ChannelOptions {
    /// What the broker needs of these options.
    pub fn publish_options(&self) -> PublishOptions {
        PublishOptions { history_size: self.history_size, history_ttl: self.history_ttl }
    }
}

/// The configured namespaces: the defaults for names without `:`, and named overrides.
#[derive(Debug, Clone, Default)]
pub struct Namespaces {
    defaults: ChannelOptions,
    named: HashMap<String, ChannelOptions>,
}

impl Namespaces {
    /// Namespaces from the `[channel_defaults]` options and the fully resolved named ones.
    pub fn new(defaults: ChannelOptions, named: HashMap<String, ChannelOptions>) -> Self {
        Namespaces { defaults, named }
    }

    /// The options of `channel`, or `None` when its namespace is not configured (error 404).
    pub fn resolve(&self, channel: &ChannelName) -> Option<&ChannelOptions> {
        match channel.namespace() {
            None => Some(&self.defaults),
            Some(ns) => self.named.get(ns),
        }
    }

    /// The default options.
    pub fn defaults(&self) -> &ChannelOptions {
        &self.defaults
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_default_named_and_unknown() {
        let market = ChannelOptions { history_size: 1000, conflate: true, ..Default::default() };
        let ns = Namespaces::new(
            ChannelOptions::default(),
            HashMap::from([("market".to_string(), market.clone())]),
        );
        let c = |s| ChannelName::parse(s).unwrap();
        assert_eq!(ns.resolve(&c("news")), Some(&ChannelOptions::default()));
        assert_eq!(ns.resolve(&c("market:AAPL")), Some(&market));
        assert_eq!(ns.resolve(&c("chat:1")), None);
    }
}
