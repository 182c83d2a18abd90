"use strict";
// tribridge does not bridge encrypted rooms. matrix-bot-sdk requires this package at load
// time but only uses it when crypto is enabled, so every export is a lazy stand-in that
// throws a clear error the moment it is called or constructed — never at require time.
const MESSAGE =
  "end-to-end encryption unavailable: tribridge is installed without @matrix-org/matrix-sdk-crypto-nodejs " +
  "(its install script downloads a native binary). Disable encryption for the bridge.";

function unavailable(name) {
  const target = function () {};
  return new Proxy(target, {
    get(_t, prop) {
      if (prop === "then" || typeof prop === "symbol") return undefined;
      if (prop === "name") return name;
      return unavailable(`${name}.${String(prop)}`);
    },
    apply() {
      throw new Error(`${MESSAGE} (called ${name})`);
    },
    construct() {
      throw new Error(`${MESSAGE} (constructed ${name})`);
    },
  });
}

module.exports = new Proxy(
  {},
  {
    get(_t, prop) {
      if (prop === "__esModule") return false;
      if (prop === "then" || typeof prop === "symbol") return undefined;
      return unavailable(String(prop));
    },
  },
);
