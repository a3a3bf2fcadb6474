package flystage.mms;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import software.amazon.ai.mms.servingsdk.Context;
import software.amazon.ai.mms.servingsdk.ModelServerEndpoint;
import software.amazon.ai.mms.servingsdk.annotations.Endpoint;
import software.amazon.ai.mms.servingsdk.annotations.helpers.EndpointTypes;
import software.amazon.ai.mms.servingsdk.http.Request;
import software.amazon.ai.mms.servingsdk.http.Response;

/**
 * GET /execution-parameters on the inference port, for SageMaker batch transform jobs that leave
 * MaxConcurrentTransforms unset. The answer is computed in Python by flystage's serve entrypoint
 * (flystage.serving.settings.execution_parameters) and passed in the environment, so the policy
 * lives, and is tested, in one place; this class only hands it out.
 */
@Endpoint(
        urlPattern = "execution-parameters",
        endpointType = EndpointTypes.INFERENCE,
        description = "flystage: batch transform execution parameters")
public final class ExecutionParametersEndpoint extends ModelServerEndpoint {
    static final String VARIABLE = "FLYSTAGE_EXECUTION_PARAMETERS";

    @Override
    public void doGet(Request request, Response response, Context context) throws IOException {
        String answer = System.getenv(VARIABLE);
        if (answer == null || answer.isEmpty()) {
            // Not started by flystage's entrypoint: no answer is better than a made-up one.
            response.setStatus(404, "Not Found");
            answer = "{\"error\": \"" + VARIABLE + " is not set\", \"status\": 404}";
        }
        response.setContentType("application/json");
        response.getOutputStream().write(answer.getBytes(StandardCharsets.UTF_8));
    }
}
