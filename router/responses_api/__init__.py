"""OpenAI's Responses API (``POST /v1/responses``) over the chat path.

    protocol   the request body (fields shoal does not implement refused by name) and the output items
    mapping    a Responses request -> the ``ChatCompletionRequest`` the chat endpoint serves, and the
               chat-side field names of its errors mapped back to the Responses names
    output     the response object and the stream's events, built from a ``Generation``

Generation itself (template, placement, workers, tool parsing, structured output) is the chat
endpoint's: nothing here generates.
"""
