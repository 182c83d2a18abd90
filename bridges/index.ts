/**
 * The connector registry: every protocol tribridge speaks. Adding one = a folder under bridges/
 * and one line here. Names must be unique (checked at start-up).
 */
import type { ConnectorDefinition } from "../src/connector.js";
import { emailConnector } from "./email/index.js";
import { mqttConnector } from "./mqtt/index.js";

export const connectors: readonly ConnectorDefinition[] = [
  mqttConnector as ConnectorDefinition,
  emailConnector as ConnectorDefinition,
];
